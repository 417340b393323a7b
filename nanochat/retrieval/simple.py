"""
`simple`: BM25 over a plain-dict inverted index, standard library only.

Same tokenizer and same formula as bm25s's default ("lucene"), so `simple` and `bm25` give the
same scores (tests check this); `simple` is the one to use without numpy/bm25s, and it is the
cheapest to construct, which matters for the tiny per-example KBs the data loader builds.
  idf(t)    = ln(1 + (N - df + 0.5) / (df + 0.5))          (always > 0)
  score(d)  = sum over query tokens t of idf(t) * tf / (tf + k1 * (1 - b + b * |d| / avgdl))
A repeated query token counts again, as in bm25s and rank-bm25.
"""
import heapq
import math
from collections import Counter

from nanochat.retrieval.base import Retriever
from nanochat.retrieval.documents import index_text, tokenize


class SimpleBM25(Retriever):
    name = "simple"

    def __init__(self, documents, k1=1.5, b=0.75):
        super().__init__(documents)
        self.k1, self.b = float(k1), float(b)
        counts = [Counter(tokenize(index_text(doc))) for doc in self.documents]
        lengths = [sum(c.values()) for c in counts]
        n = len(counts)
        avgdl = (sum(lengths) / n) if n else 0.0
        postings = {}
        for i, c in enumerate(counts):
            for term, tf in c.items():
                postings.setdefault(term, []).append((i, tf))
        # fold idf and length normalisation into one weight per posting: a query is then
        # just a sum of precomputed floats
        self.index = {}
        for term, plist in postings.items():
            idf = math.log(1.0 + (n - len(plist) + 0.5) / (len(plist) + 0.5))
            self.index[term] = [
                (i, idf * tf / (tf + self.k1 * (1.0 - self.b + self.b * lengths[i] / avgdl)))
                for i, tf in plist
            ]

        # the largest contribution each term can make to any document; hybrid fusion divides by
        # the sum of these to tell "the query's key terms matched" from "one common word matched"
        self.best = {term: max(w for _, w in plist) for term, plist in self.index.items()}
        self.best_unknown = max(self.best.values(), default=0.0)

    def best_possible(self, query):
        """Sum over query tokens of the largest contribution each can make to any document;
        a token the corpus never saw counts as the most informative known one (it could not match)."""
        return sum(self.best.get(t, self.best_unknown) for t in tokenize(query))

    def lexical_scores(self, query):
        """{doc position: score} for every document sharing a token with the query."""
        acc = {}
        for term in tokenize(query):
            for i, w in self.index.get(term, ()):
                acc[i] = acc.get(i, 0.0) + w
        return acc

    def rank_batch(self, queries, k):
        out = []
        for q in queries:
            acc = self.lexical_scores(q)
            out.append(heapq.nsmallest(k, acc.items(), key=lambda item: (-item[1], item[0])))
        return out
