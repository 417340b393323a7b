"""
`bm25`: BM25 backed by bm25s, which precomputes every (term, doc) score into a sparse matrix,
so a query is a few array gathers (hundreds of times faster than rank-bm25's Python loop).

We tokenize ourselves (the shared tokenizer in documents.py, English stopwords removed) and take
the top k ourselves, so ties are broken by document order and documents that share no token
with the query are never returned (no zero-score padding).
"""
import os
import json
import hashlib
from array import array
from types import SimpleNamespace

import numpy as np
import bm25s

from nanochat.retrieval.base import Retriever, top_k_positions
from nanochat.retrieval.documents import index_text, tokenize

# bm25l and bm25+ are left out on purpose: they give every document a non-zero score, so
# "shares no token with the query" could no longer be told apart from a weak match.
METHODS = ("lucene", "robertson", "atire")


class BM25Retriever(Retriever):
    name = "bm25"

    def __init__(self, documents, method="lucene", k1=1.5, b=0.75, idf_method=None, _index=None, _best=None):
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
        self._best_unknown = None
        self._best = _best  # per-term maxima, made on first use (only hybrid fusion asks)

    @property
    def best(self):
        """Largest score contribution of each term to any document (column max of the sparse
        matrix); see SimpleBM25.best_possible for why hybrid fusion wants it. Computing it reads the
        whole matrix, so a KB stores it (best.npy) and a loaded one maps it instead."""
        if self._best is None:
            self._best = term_maxima(self.bm25, len(self.vocab))
        return self._best

    def best_possible(self, query):
        best = self.best
        if self._best_unknown is None:
            self._best_unknown = float(np.max(best, initial=0.0))
        ids = [self.vocab.get(t) for t in tokenize(query)]
        return float(sum(self._best_unknown if i is None else best[i] for i in ids))

    def query_ids(self, query):
        # unknown tokens are dropped, repeated ones kept (they count again, as in rank-bm25)
        ids = [self.vocab.get(t) for t in tokenize(query)]
        return [i for i in ids if i is not None]

    def all_scores(self, query):
        """Scores of every document (numpy float32, zeros where no token matched), or None."""
        ids = self.query_ids(query)
        if not ids:
            return None
        scores = self.bm25.scores
        if not isinstance(scores["data"], np.memmap) or self.bm25.nonoccurrence_array is not None:
            return self.bm25.get_scores_from_ids(ids)
        # a mapped index: each term's postings read with pread and summed as bm25s sums them (np.add.at,
        # term by term). Touching them through the mapping would keep each page (and the kernel's
        # fault-around of 16 pages) in this process's RSS for as long as it runs.
        data, indices, indptr = scores["data"], scores["indices"], scores["indptr"]
        total = np.zeros(scores["num_docs"], dtype=np.dtype(self.bm25.dtype))
        with open(data.filename, "rb") as data_file, open(indices.filename, "rb") as indices_file:
            for i in ids:
                start, end = int(indptr[i]), int(indptr[i + 1])
                np.add.at(total, read_range(indices_file, indices, start, end), read_range(data_file, data, start, end))
        return total

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

    # -- disk: bm25s's own format (.npy arrays + JSON vocab/params; no pickle) + best.npy ----

    def save(self, directory):
        save_index(self.bm25, len(self.documents), directory, self._best)

    @classmethod
    def load(cls, directory, documents, mmap=False):
        if os.path.exists(os.path.join(directory, "empty.json")):
            return cls(documents)
        # mapped: the terms come from TermIds' arrays, not bm25s's JSON vocabulary (a dict of every term)
        mapped = mmap and os.path.exists(os.path.join(directory, TERM_HASHES))
        index = bm25s.BM25.load(directory, mmap=mmap, load_vocab=not mapped, show_progress=False)
        if index.scores["num_docs"] != len(documents):
            raise ValueError(f"{directory}: BM25 index has {index.scores['num_docs']} documents, "
                             f"the KB has {len(documents)} chunks (KB is inconsistent; rebuild it)")
        if mapped:
            index.vocab_dict = TermIds.load(directory)
        best_path = os.path.join(directory, "best.npy")   # absent in KBs built before it was stored
        best = np.load(best_path, mmap_mode="r" if mmap else None, allow_pickle=False) if os.path.exists(best_path) else None
        return cls(documents, _index=index, _best=best)


def read_range(f, mapped, start, end):
    """mapped[start:end] read with pread from f, the .npy file behind the np.memmap `mapped`:
    private memory, freed with the result, instead of mapped pages."""
    item = mapped.dtype.itemsize
    return np.frombuffer(os.pread(f.fileno(), (end - start) * item, mapped.offset + start * item), dtype=mapped.dtype)


TERM_HASHES, TERM_IDS = "terms.hashes.npy", "terms.ids.npy"


def term_hash(term):
    # 64 bits: two of a million terms share one with probability ~3e-8; save_index checks anyway
    return int.from_bytes(hashlib.blake2b(term.encode(), digest_size=8).digest(), "little")


class TermIds:
    """term -> id like bm25s's vocabulary dict, from two memory-mapped arrays (the sorted 64-bit
    hashes of the terms and their ids): a loaded index holds no Python object per term (a dict
    costs ~200 bytes per term, and a large KB has millions)."""

    def __init__(self, hashes, ids):
        self.hashes, self.ids = hashes, ids

    @classmethod
    def load(cls, directory):
        return cls(*(np.load(os.path.join(directory, n), mmap_mode="r", allow_pickle=False) for n in (TERM_HASHES, TERM_IDS)))

    def __len__(self):
        return len(self.ids)

    def get(self, term, default=None):
        h = np.uint64(term_hash(term))
        i = int(np.searchsorted(self.hashes, h))
        return int(self.ids[i]) if i < len(self.hashes) and self.hashes[i] == h else default

    def __contains__(self, term):
        return self.get(term) is not None


def save_term_ids(vocab, directory):
    """The vocabulary as TermIds' two arrays; not written if two terms share a hash (the index then
    loads bm25s's JSON vocabulary, as KBs built before these files did)."""
    hashes = np.fromiter((term_hash(t) for t in vocab), dtype=np.uint64, count=len(vocab))
    ids = np.fromiter(vocab.values(), dtype=np.int64, count=len(vocab))
    order = np.argsort(hashes, kind="stable")
    hashes, ids = hashes[order], ids[order]
    if len(hashes) > 1 and np.any(hashes[1:] == hashes[:-1]):
        return
    np.save(os.path.join(directory, TERM_HASHES), hashes, allow_pickle=False)
    np.save(os.path.join(directory, TERM_IDS), ids, allow_pickle=False)


def save_index(bm25, num_docs, directory, best=None):
    if bm25.scores is None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "empty.json"), "w") as f:
            json.dump({"num_docs": num_docs}, f)
        return
    bm25.save(directory, show_progress=False)
    save_term_ids(bm25.vocab_dict, directory)
    best = term_maxima(bm25, len(bm25.vocab_dict)) if best is None else best
    np.save(os.path.join(directory, "best.npy"), np.asarray(best), allow_pickle=False)


def term_maxima(bm25, vocab_size):
    best = np.zeros(vocab_size, dtype=np.float64)
    if bm25.scores is not None:
        data, indptr = np.asarray(bm25.scores["data"]), np.asarray(bm25.scores["indptr"])
        nonempty = np.flatnonzero(indptr[1:] > indptr[:-1])
        if len(nonempty):
            best[nonempty] = np.maximum.reduceat(data, indptr[nonempty])
    return best


class _TokenIds:
    """The corpus as bm25s reads it (three passes): each chunk's token ids, read back in order from
    the scratch file index_to_disk wrote, so no pass holds more than one chunk's tokens."""

    def __init__(self, path, lengths):
        self.path, self.lengths = path, lengths

    def __len__(self):
        return len(self.lengths)

    def __iter__(self):
        with open(self.path, "rb", buffering=1 << 20) as f:
            for n in self.lengths:
                yield np.frombuffer(f.read(4 * n), dtype=np.int32).tolist()


def index_to_disk(chunks, directory, scratch, method="lucene", k1=1.5, b=0.75, show_progress=False):
    """Index an iterable of chunks (a KB's chunk store) with bm25s and save it to `directory`,
    streaming: the chunks are tokenized once into `scratch` (int32 ids; removed after), which
    bm25s then reads back. Same scores as BM25Retriever(list(chunks)): only the ids that bm25s
    numbers terms with differ. Memory: the vocabulary, 8 bytes per chunk, and bm25s's own arrays
    (~40 bytes per distinct term of each chunk while it builds its sparse matrix)."""
    from tqdm import tqdm
    if method not in METHODS:
        raise ValueError(f"unknown BM25 method {method!r} (choose from {', '.join(METHODS)})")
    vocab, lengths = {}, array("q")
    with open(scratch, "wb", buffering=1 << 20) as f:
        for doc in tqdm(chunks, desc="tokenizing", unit=" chunks", disable=not show_progress):
            ids = [vocab.setdefault(t, len(vocab)) for t in tokenize(index_text(doc))]
            f.write(array("i", ids).tobytes())
            lengths.append(len(ids))
    bm25 = bm25s.BM25(method=method, k1=k1, b=b)
    if vocab:
        bm25.index(SimpleNamespace(ids=_TokenIds(scratch, lengths), vocab=vocab), show_progress=False)
    else:   # bm25s cannot index a corpus with no tokens at all
        bm25.scores, bm25.vocab_dict = None, {}
    os.remove(scratch)
    save_index(bm25, len(lengths), directory)
