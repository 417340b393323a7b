"""Knowledge-base commands: python -m kb_tools.build_kb | search_kb | eval_retrieval | make_qa | machine_qa (--help on each)."""
import sys


def die(message, code=2):
    """Same contract as nanochat.common.die (one `error: ...` line, exit 2), without importing
    torch: a bm25 search_kb then starts in ~0.7 s instead of ~3 s."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)
