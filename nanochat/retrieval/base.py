"""
What every retriever shares (standard library only, like documents.py and simple.py):
the search / search_batch interface on top of one method,
rank_batch(queries, k) -> per query a list of (position in self.documents, score), best first.
Hybrid fusion works on those positions, so it never touches (or aliases) document objects.
"""
from abc import ABC, abstractmethod
from numbers import Integral

from nanochat.retrieval.documents import SearchResult


def check_top_k(top_k):
    if isinstance(top_k, bool) or not isinstance(top_k, Integral) or top_k <= 0:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    return int(top_k)


def top_k_positions(scores, k, positions=None):
    """Indices of the k highest scores, best first, ties broken by the lower index so results
    are identical run to run. `positions` (optional) maps the entries of scores to doc positions."""
    import numpy as np  # here, not at the top: `simple` and this module stay standard-library only
    n = len(scores)
    k = min(k, n)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k < n:
        kth = np.partition(scores, n - k)[n - k]  # the k-th largest value
        above = np.flatnonzero(scores > kth)
        tied = np.flatnonzero(scores == kth)[:k - len(above)]
        idx = np.concatenate([above, tied])
    else:
        idx = np.arange(n)
    idx = idx[np.lexsort((idx, -scores[idx]))]
    return idx if positions is None else positions[idx]


class Retriever(ABC):
    name = ""

    def __init__(self, documents):
        # a KB's chunk store (store.JsonlStore) reads from disk and never changes: keep it, not a
        # copy of every chunk; anything else is copied so the caller's list can change freely
        self.documents = documents if getattr(documents, "read_only", False) else list(documents)

    def __len__(self):
        return len(self.documents)

    @abstractmethod
    def rank_batch(self, queries, k):
        """Per query, up to k (position in self.documents, score) pairs, best first."""

    def search_batch(self, queries, top_k):
        if isinstance(queries, str):
            raise TypeError("search_batch takes a list of queries; use search() for one string")
        top_k = check_top_k(top_k)
        queries = list(queries)
        if not queries or not self.documents:
            return [[] for _ in queries]
        ranked = self.rank_batch(queries, top_k)
        docs = self.documents
        return [[SearchResult(docs[i], float(s)) for i, s in hits] for hits in ranked]

    def search(self, query, top_k):
        return self.search_batch([query], top_k)[0]
