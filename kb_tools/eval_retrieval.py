"""
Evaluate a retriever on a knowledge base with labelled queries.

    python -m kb_tools.eval_retrieval --kb kb/wiki --queries queries.jsonl --retriever hybrid

queries.jsonl lines are {"query": "...", "relevant": ["doc id", ...]} (a QA file's {"question",
"supporting_ids"} lines work too). Reports Recall@1/5/10/100,
MRR@10 and nDCG@10 at the document level (any chunk of a relevant document is a hit, each document
counted once) and queries/s of the retrieval calls.
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
parser.add_argument("--queries", required=True, metavar="FILE.jsonl", help='{"query", "relevant": [doc ids]} per line')
parser.add_argument("--retriever", default="bm25", help="simple | bm25 | dense | hybrid (default bm25)")
parser.add_argument("--query-encoder", default="tuned", choices=["tuned", "base"], help="dense/hybrid: tuned = the KB's trained query encoder when it has one (scripts.retriever_train), base = the embedding model")
parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
args = parser.parse_args()

from nanochat.retrieval import RetrievalManager, RETRIEVERS  # noqa: E402
from nanochat.retrieval.evaluate import evaluate, read_queries  # noqa: E402

if args.retriever not in RETRIEVERS:
    die(f"--retriever must be one of {', '.join(RETRIEVERS)}, got {args.retriever!r}")
try:
    queries = read_queries(args.queries)
    manager = RetrievalManager(args.kb, retriever=args.retriever, query_encoder=args.query_encoder)
    for q in queries:
        missing = [r for r in q["relevant"] if not manager.has_document(r)]
        if missing:
            raise ValueError(f"{args.queries}:{q['line']}: relevant doc {missing[0]!r} is not in {args.kb}")
    metrics, _ = evaluate(manager, queries)
except (ValueError, FileNotFoundError) as e:
    die(str(e))

if args.json:
    print(json.dumps(dict(metrics, retriever=args.retriever, kb=args.kb)))
else:
    print(f"{args.retriever} on {args.kb}, {metrics['queries']} queries")
    for name in ("recall@1", "recall@5", "recall@10", "recall@100", "mrr@10", "ndcg@10"):
        print(f"  {name:<11} {metrics[name]:.4f}")
    print(f"  {'queries/s':<11} {metrics['queries_per_s']:.1f}")
