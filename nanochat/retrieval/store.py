"""
A KB's documents and chunks stay on disk and are read by offset.

docs.jsonl and chunks.jsonl are written once by build_kb; beside each, `<name>.offsets.npy` holds
the byte offset where every line starts (int64, one more than the lines: the last is the file
size). A loaded KB memory-maps those offsets, so it holds 8 bytes per chunk that the OS can share
between processes (every torchrun rank of an RL run maps the same pages) instead of every chunk as
Python objects (~4 KB each measured: 82 GB for 21M passages, in every rank).

    store = JsonlStore("kb/chunks.jsonl", np.load("kb/chunks.offsets.npy", mmap_mode="r"))
    len(store); store[17]; store[-1]; store[3:5]; for doc in store: ...

Two small arrays beside docs.jsonl make lookups by id cheap without an in-memory dict:
    docs.chunks.npy   int64, num_docs + 1: the chunks of document i are chunks[start[i]:start[i+1]]
    docs.keys.npy     uint64, (3, num_docs): sorted 64-bit hashes of document ids, the document
                      each belongs to, and sorted hashes of document texts (build_kb --add's
                      duplicate check)
Standard library and numpy only.
"""
import os
import json
import hashlib
import operator
from array import array

import numpy as np

from nanochat.retrieval.documents import Document, content_key


def id_hash(doc_id):
    """64 bits of blake2b of a document id."""
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "little")


def text_hash(doc):
    """64 bits of the duplicate key (sha1 of the stripped text): a document's text seen before is a duplicate."""
    return int(content_key(doc)[:16], 16)


def line_offsets(path):
    """Offsets of every line start plus the file size, from one pass in 16 MB blocks (KBs built
    before the offsets were written; a 1 GB file takes about a second)."""
    parts, pos = [np.zeros(1, dtype=np.int64)], 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            newlines = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10)
            parts.append(newlines.astype(np.int64) + (pos + 1))
            pos += len(block)
    offsets = np.concatenate(parts)
    if offsets[-1] != pos:   # a last line without its newline
        offsets = np.append(offsets, pos)
    return offsets


class JsonlStore:
    """Read-only sequence of the Documents of a .jsonl file, each read from disk when asked for."""
    read_only = True   # retrievers keep the store as it is instead of copying it into a list

    def __init__(self, path, offsets):
        self.path, self.offsets = path, offsets
        self._fd = None

    def __len__(self):
        return len(self.offsets) - 1

    def _read(self, i):
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        # pread has no shared file position: threads (chat_web's workers) can share the descriptor
        return Document.from_json(json.loads(os.pread(self._fd, end - start, start)))

    def __getitem__(self, i):
        n = len(self)
        if isinstance(i, slice):
            return [self._read(j) for j in range(*i.indices(n))]
        i = operator.index(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{self.path}: index {i} out of range ({n} lines)")
        return self._read(i)

    def __iter__(self):
        return self.iter_range(0, len(self))

    def iter_range(self, start, stop):
        """Documents start..stop-1, read sequentially (much faster than one pread each)."""
        if start >= stop:
            return
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[start]))
            for _ in range(start, stop):
                yield Document.from_json(json.loads(f.readline()))

    def __getstate__(self):   # a descriptor does not travel to another process; reopen there
        return dict(self.__dict__, _fd=None)

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


def open_store(kb_dir, name):
    """JsonlStore of kb_dir/<name>.jsonl; offsets memory-mapped, or found by one pass for older KBs."""
    path = os.path.join(kb_dir, f"{name}.jsonl")
    offsets_path = os.path.join(kb_dir, f"{name}.offsets.npy")
    if os.path.exists(offsets_path):
        offsets = np.load(offsets_path, mmap_mode="r", allow_pickle=False)
    else:
        offsets = line_offsets(path)
    return JsonlStore(path, offsets)


class JsonlWriter:
    """Appends Documents to a .jsonl file (a new one, or a copy of an old KB's), keeping the offsets."""

    def __init__(self, path, offsets=None):
        self.path = path
        self.file = open(path, "ab")
        self.offsets = array("q", [0])
        if offsets is not None:
            self.offsets = array("q")
            self.offsets.frombytes(np.ascontiguousarray(offsets, dtype=np.int64).tobytes())
        if self.file.tell() != self.offsets[-1]:
            raise ValueError(f"{path}: {self.file.tell()} bytes, but its offsets end at {self.offsets[-1]}; rebuild the KB")

    def __len__(self):
        return len(self.offsets) - 1

    def write(self, doc):
        line = (json.dumps(doc.to_json(), ensure_ascii=False) + "\n").encode("utf-8")
        self.file.write(line)
        self.offsets.append(self.offsets[-1] + len(line))

    def close(self, offsets_path):
        self.file.close()
        np.save(offsets_path, np.frombuffer(self.offsets, dtype=np.int64), allow_pickle=False)


class HashSet:
    """A set of 64-bit hashes in ~8 bytes each (a Python set of ints costs ~70): a sorted array plus
    the recent additions, merged into it once they are a quarter of its size."""

    def __init__(self, hashes=()):
        self.sorted = np.unique(np.asarray(hashes, dtype=np.uint64))
        self.recent = set()

    def __contains__(self, h):
        if h in self.recent:
            return True
        i = int(np.searchsorted(self.sorted, np.uint64(h)))
        return i < len(self.sorted) and int(self.sorted[i]) == h

    def add(self, h):
        self.recent.add(h)
        if len(self.recent) >= max(1 << 16, len(self.sorted) // 4):
            self.sorted = np.union1d(self.sorted, np.fromiter(self.recent, dtype=np.uint64, count=len(self.recent)))
            self.recent = set()


def doc_keys(id_hashes, text_hashes):
    """docs.keys.npy's array from per-document hashes in document order."""
    order = np.argsort(id_hashes, kind="stable")
    return np.stack([id_hashes[order], order.astype(np.uint64), np.sort(text_hashes)])


def derive_doc_index(documents, chunks):
    """(docs.chunks, docs.keys) of a KB built before they were written: one pass over both files."""
    id_hashes = np.fromiter((id_hash(d.id) for d in documents), dtype=np.uint64, count=len(documents))
    text_hashes = np.fromiter((text_hash(d) for d in documents), dtype=np.uint64, count=len(documents))
    start = np.zeros(len(documents) + 1, dtype=np.int64)
    doc, previous = -1, None
    for i, c in enumerate(chunks):   # a document's chunks are consecutive, in document order
        if c.doc_id != previous:
            doc, previous = doc + 1, c.doc_id
            start[doc] = i
    start[doc + 1:] = len(chunks)
    return start, doc_keys(id_hashes, text_hashes)
