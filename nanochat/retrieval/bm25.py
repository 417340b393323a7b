"""
`bm25`: BM25 backed by bm25s, which precomputes every (term, doc) score into a sparse matrix,
so a query is a few array gathers (hundreds of times faster than rank-bm25's Python loop).

We tokenize ourselves (the shared tokenizer in documents.py, English stopwords removed) and take
the top k ourselves, so ties are broken by document order and documents that share no token
with the query are never returned (no zero-score padding).
"""
import os
import json

import numpy as np
import bm25s

from nanochat.retrieval.base import Retriever, top_k_positions
from nanochat.retrieval.documents import index_text, tokenize

# bm25l and bm25+ are left out on purpose: they give every document a non-zero score, so
# "shares no token with the query" could no longer be told apart from a weak match.
METHODS = ("lucene", "robertson", "atire")


class BM25Retriever(Retriever):
    name = "bm25"

    def __init__(self, documents, method="lucene", k1=1.5, b=0.75, idf_method=None, _index=None):
        super().__init__(documents)
        if method not in METHODS:
            raise ValueError(f"unknown BM25 method {method!r} (choose from {', '.join(METHODS)})")
        if _index is not None:  # loaded from disk by BM25Retriever.load
            self.bm25 = _index
        else:
            self.bm25 = bm25s.BM25(method=method, k1=k1, b=b, idf_method=idf_method)
            corpus = [tokenize(index_text(doc)) for doc in self.documents]
            if any(corpus):  # bm25s cannot index a corpus with no tokens at all
                self.bm25.index(corpus, show_progress=False)
            else:
                self.bm25.scores, self.bm25.vocab_dict = None, {}
        self.vocab = self.bm25.vocab_dict
        # largest score contribution of each term to any document (column max of the sparse
        # matrix); see SimpleBM25.best_possible for why hybrid fusion wants it
        self.best = np.zeros(len(self.vocab), dtype=np.float64)
        if self.bm25.scores is not None:
            data, indptr = np.asarray(self.bm25.scores["data"]), np.asarray(self.bm25.scores["indptr"])
            nonempty = np.flatnonzero(indptr[1:] > indptr[:-1])
            if len(nonempty):
                self.best[nonempty] = np.maximum.reduceat(data, indptr[nonempty])
        self.best_unknown = float(self.best.max(initial=0.0))

    def best_possible(self, query):
        vocab, best = self.vocab, self.best
        return float(sum(best[vocab[t]] if t in vocab else self.best_unknown for t in tokenize(query)))

    def query_ids(self, query):
        # unknown tokens are dropped, repeated ones kept (they count again, as in rank-bm25)
        vocab = self.vocab
        return [vocab[t] for t in tokenize(query) if t in vocab]

    def all_scores(self, query):
        """Scores of every document (numpy float32, zeros where no token matched), or None."""
        ids = self.query_ids(query)
        if not ids:
            return None
        return self.bm25.get_scores_from_ids(ids)

    def lexical_scores(self, query):
        """(positions, scores) of every document sharing a token with the query."""
        scores = self.all_scores(query)
        if scores is None:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        # every bm25s idf variant is >= 0 (robertson is clipped at 0), so 0 means "no match"
        hit = np.flatnonzero(scores > 0)
        return hit, scores[hit]

    def rank_batch(self, queries, k):
        out = []
        for q in queries:
            pos, sc = self.lexical_scores(q)
            best = top_k_positions(sc, k)
            out.append(list(zip(pos[best].tolist(), sc[best].tolist())))
        return out

    # -- disk: bm25s's own format (.npy arrays + JSON vocab/params; no pickle) -------------

    def save(self, directory):
        if self.bm25.scores is None:
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, "empty.json"), "w") as f:
                json.dump({"num_docs": len(self.documents)}, f)
            return
        self.bm25.save(directory, show_progress=False)

    @classmethod
    def load(cls, directory, documents, mmap=False):
        if os.path.exists(os.path.join(directory, "empty.json")):
            return cls(documents)
        index = bm25s.BM25.load(directory, mmap=mmap, show_progress=False)
        if index.scores["num_docs"] != len(documents):
            raise ValueError(f"{directory}: BM25 index has {index.scores['num_docs']} documents, "
                             f"the KB has {len(documents)} chunks (KB is inconsistent; rebuild it)")
        return cls(documents, _index=index)
