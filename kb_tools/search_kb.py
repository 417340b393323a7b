"""
Search a knowledge base from the command line.

    python -m kb_tools.search_kb --kb kb/wiki --retriever hybrid --top-k 5 --query "who wrote Hamlet"
"""
import os
# torch's OpenMP threads spin-wait between ops; on a CPU shared with other jobs that made a
# single-query encode 10x slower (292 ms vs 29 ms measured). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import argparse
import json

from kb_tools import die

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--kb", required=True, metavar="KB_DIR", help="knowledge base directory (from kb_tools.build_kb)")
parser.add_argument("--retriever", default="bm25", help="simple | bm25 | dense | hybrid (default bm25)")
parser.add_argument("--query-encoder", default="tuned", choices=["tuned", "base"], help="dense/hybrid: tuned = the KB's trained query encoder when it has one (scripts.retriever_train), base = the embedding model")
parser.add_argument("--top-k", type=int, default=5, help="number of results (default 5)")
parser.add_argument("--query", required=True, help="the query text")
parser.add_argument("--json", action="store_true", help="print one JSON object per result instead of a listing")
args = parser.parse_args()

if args.top_k <= 0:
    die(f"--top-k must be at least 1, got {args.top_k}")

from nanochat.retrieval import RetrievalManager, RETRIEVERS  # noqa: E402

if args.retriever not in RETRIEVERS:
    die(f"--retriever must be one of {', '.join(RETRIEVERS)}, got {args.retriever!r}")

try:
    manager = RetrievalManager(args.kb, retriever=args.retriever, query_encoder=args.query_encoder)
    results = manager.search(args.query, args.top_k)
except (ValueError, FileNotFoundError) as e:
    die(str(e))

if not args.json:   # what a result is: a whole document or a chunk of one, and how long chunks are
    chunking = manager.kb.manifest.get("chunking", {})
    print(f"{args.kb}: {manager.kb.manifest['num_chunks']:,} chunks of up to {chunking.get('chunk_words', '?')} words "
          f"(overlap {chunking.get('overlap', '?')}), {args.retriever}")
for rank, r in enumerate(results, 1):
    d = r.document
    if args.json:
        print(json.dumps({"rank": rank, "score": r.score, "id": d.id, "doc_id": d.doc_id, "title": d.title, "text": d.text},
                         ensure_ascii=False))
    else:
        snippet = " ".join(d.text.split())[:200]
        print(f"{rank:>3}. {r.score:8.4f}  {d.id}  {d.title}\n     {snippet}")
if not results and not args.json:
    print("no results")
