"""
`hybrid`: lexical (BM25) and dense candidates, fused, optionally reranked.

Candidates: the top `candidates` (100) of each retriever. Both retrievers index the same
document list, so fusion works on positions in that list; no document object is shared
mutable state (the old fork's hybrid silently became BM25 because both wrote `doc.score`).
For every candidate we know both exact scores: its BM25 score (0 if it shares no token with the
query) and its cosine (from the stored embeddings), so no candidate gets an invented score.

Fusions (alpha weighs the lexical side):
  convex  (default) alpha * min(1, bm25 / best_possible(query)) + (1 - alpha) * cosine.
          best_possible is the sum over query tokens of the largest score each token can add to
          any document (an unseen token counts as the most informative known one), so the lexical
          term says how much of the query's evidence a document holds: ~1 when an error code or
          identifier matched, small when only a common word did. Cosine is used as it is.
  minmax  alpha * minmax(bm25) + (1 - alpha) * minmax(cosine) over the candidate union
          (the convex combination of Bruch et al. 2023).
  rrf     sum of 1 / (60 + rank) over the two candidate lists (Cormack et al. 2009).
Measured (README, `python -m bench.bench_retrieval`): on lookups where BM25 wins and paraphrases
where dense wins, only `convex` with alpha in about [0.35, 0.45] stays within 0.03 nDCG@10 of the
better single retriever on both; rrf and minmax lose 0.05-0.5 on one of them. Default alpha 0.4.

Rerank (off by default): "dense" re-orders the fused top max(rerank_depth, k) by cosine; any other
value is a sentence-transformers CrossEncoder name or path. No reranker weights ship offline,
so "dense" is the only reranker available out of the box, and it mostly undoes BM25's wins.
"""
import numpy as np

from nanochat.retrieval.base import Retriever, top_k_positions
from nanochat.retrieval.dense import load_cross_encoder
from nanochat.retrieval.documents import index_text

FUSIONS = ("convex", "minmax", "rrf")
DEFAULT_FUSION = "convex"
DEFAULT_ALPHA = 0.4
RRF_K = 60


def _minmax(x):
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


class HybridRetriever(Retriever):
    name = "hybrid"

    def __init__(self, lexical, dense, fusion=DEFAULT_FUSION, alpha=DEFAULT_ALPHA, candidates=100,
                 rerank=None, rerank_depth=20):
        same = lexical.documents is dense.documents   # one KB's chunk store: nothing to compare (or read)
        if not same and (len(lexical.documents) != len(dense.documents) or any(
                a.id != b.id for a, b in zip(lexical.documents, dense.documents))):
            raise ValueError("hybrid: the lexical and dense retrievers must index the same documents in the same order")
        super().__init__(lexical.documents)
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r} (choose from {', '.join(FUSIONS)})")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if candidates <= 0 or rerank_depth <= 0:
            raise ValueError("candidates and rerank_depth must be positive")
        self.lexical, self.dense = lexical, dense
        self.fusion, self.alpha, self.candidates = fusion, float(alpha), int(candidates)
        self.rerank, self.rerank_depth = rerank, int(rerank_depth)
        self.cross_encoder = None
        if rerank not in (None, "dense"):
            self.cross_encoder = load_cross_encoder(rerank)

    def _lexical(self, query):
        scores = self.lexical.lexical_scores(query)
        if isinstance(scores, dict):  # SimpleBM25 returns {position: score}
            pos = np.array(sorted(scores), dtype=np.int64)
            return pos, np.array([scores[i] for i in pos.tolist()], dtype=np.float64)
        pos, sc = scores
        return pos.astype(np.int64), sc.astype(np.float64)

    def fuse(self, query, qvec, dense_hits):
        """(positions, fused scores, cosines) of the candidate union for one query, best first."""
        lex_pos, lex_sc = self._lexical(query)
        lex_top = lex_pos[top_k_positions(lex_sc, self.candidates)]
        dense_top = np.array([i for i, _ in dense_hits], dtype=np.int64)
        union = np.unique(np.concatenate([lex_top, dense_top]))
        if len(union) == 0:
            return union, np.zeros(0), np.zeros(0)
        # exact scores of every candidate under both retrievers (lex_pos is sorted)
        bm25 = np.zeros(len(union))
        if len(lex_pos):
            where = np.minimum(np.searchsorted(lex_pos, union), len(lex_pos) - 1)
            hit = lex_pos[where] == union
            bm25[hit] = lex_sc[where[hit]]
        cosine = np.asarray(self.dense.embeddings[union], dtype=np.float32) @ qvec
        if self.fusion == "rrf":
            fused = np.zeros(len(union))
            for ranked in (lex_top, dense_top):
                rank = {p: r for r, p in enumerate(ranked.tolist(), 1)}
                fused += np.array([1.0 / (RRF_K + rank[p]) if p in rank else 0.0 for p in union.tolist()])
        elif self.fusion == "minmax":
            fused = self.alpha * _minmax(bm25) + (1.0 - self.alpha) * _minmax(cosine.astype(np.float64))
        else:
            best = self.lexical.best_possible(query)
            lexical = np.minimum(bm25 / best, 1.0) if best > 0 else np.zeros_like(bm25)
            fused = self.alpha * lexical + (1.0 - self.alpha) * cosine.astype(np.float64)
        order = top_k_positions(fused, len(union))
        return union[order], fused[order], cosine[order]

    def rank_batch(self, queries, k):
        vecs, keep = self.dense.encode_queries(queries)
        dense_hits = self.dense.search_vectors(vecs, keep, self.candidates)
        out = []
        for q, v, ok, hits in zip(queries, vecs, keep, dense_hits):
            if not ok:
                out.append([])
                continue
            pos, fused, cosine = self.fuse(q, v, hits)
            if self.rerank is not None and len(pos):
                # results are the reranked head only, so every returned score is the reranker's
                pos = pos[:max(self.rerank_depth, k)]
                if self.cross_encoder is None:
                    fused = cosine[:len(pos)].astype(np.float64)
                else:
                    pairs = [(q, index_text(self.documents[i])) for i in pos.tolist()]
                    fused = np.asarray(self.cross_encoder.predict(pairs, show_progress_bar=False), dtype=np.float64)
                order = top_k_positions(fused, len(pos))
                pos, fused = pos[order], fused[order]
            out.append(list(zip(pos[:k].tolist(), fused[:k].tolist())))
        return out
