"""
Retrieval metrics at the document level: Recall@1/5/10/100, MRR@10, nDCG@10 (binary gains).

Retrievers return chunks; a hit is any chunk whose doc_id is relevant, and each document counts
once, at the rank of its best chunk. Cross-checked against pytrec_eval in the tests.
"""
import json
import math
import time

CUTOFFS = (1, 5, 10, 100)
DEPTH = 100  # results fetched per query: enough for Recall@100


def read_queries(path):
    """[{"query": str, "relevant": [doc ids]}, ...] from a JSONL file; errors name file:line. A QA file's
    lines ({"question", "supporting_ids", ...}, tasks/jsonl_qa.py) are read as queries too."""
    queries = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8") from None
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if isinstance(obj, dict) and "query" not in obj and "question" in obj:
                obj = {"query": obj["question"], "relevant": obj.get("supporting_ids")}
            if not isinstance(obj, dict) or not isinstance(obj.get("query"), str) or not obj["query"].strip():
                raise ValueError(f"{path}:{lineno}: expected {{\"query\": non-empty string, \"relevant\": [doc ids]}}")
            rel = obj.get("relevant")
            if not isinstance(rel, list) or not rel:
                raise ValueError(f"{path}:{lineno}: 'relevant' must be a non-empty list of doc ids")
            queries.append({"query": obj["query"], "relevant": [str(r) for r in rel], "line": lineno})
    if not queries:
        raise ValueError(f"{path}: no queries")
    return queries


def doc_ranking(results):
    """Doc ids in order of their best chunk, each once."""
    return list(dict.fromkeys(r.document.doc_id for r in results))


def query_metrics(ranking, relevant):
    relevant = set(relevant)
    out = {f"recall@{k}": len(relevant.intersection(ranking[:k])) / len(relevant) for k in CUTOFFS}
    first = next((i for i, d in enumerate(ranking[:10], 1) if d in relevant), None)
    out["mrr@10"] = 1.0 / first if first else 0.0
    dcg = sum(1.0 / math.log2(i + 1) for i, d in enumerate(ranking[:10], 1) if d in relevant)
    idcg = sum(1.0 / math.log2(i + 1) for i in range(1, min(len(relevant), 10) + 1))
    out["ndcg@10"] = dcg / idcg
    return out


def evaluate(retriever, queries, batch_size=64):
    """Mean metrics over the queries, plus queries/s of the retrieval calls alone."""
    rankings, seconds = [], 0.0
    for i in range(0, len(queries), batch_size):
        batch = [q["query"] for q in queries[i:i + batch_size]]
        t0 = time.perf_counter()
        results = retriever.search_batch(batch, DEPTH)
        seconds += time.perf_counter() - t0
        rankings += [doc_ranking(r) for r in results]
    per_query = [query_metrics(rk, q["relevant"]) for rk, q in zip(rankings, queries)]
    summary = {name: sum(m[name] for m in per_query) / len(per_query) for name in per_query[0]}
    summary["queries"] = len(queries)
    summary["queries_per_s"] = len(queries) / seconds if seconds > 0 else float("inf")
    return summary, rankings
