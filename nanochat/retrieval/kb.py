"""
Knowledge bases on disk, and the RetrievalManager that serves one.

A KB is a directory:
    manifest.json     format version, created-with, retrievers built, chunking, BM25 params,
                      embedding model + dimension + index type, doc/chunk counts, sha256 of every file
    docs.jsonl        the documents, one JSON object per line
    chunks.jsonl      the chunks that are actually indexed (metadata.doc_id names the parent)
    *.offsets.npy     where each line of docs.jsonl / chunks.jsonl starts (store.py: read by offset)
    docs.chunks.npy   the first chunk of each document; docs.keys.npy: hashes of ids and texts
    bm25/             bm25s's own saved index (.npy + JSON) + best.npy (each term's largest score)
    dense/            embeddings.npy (float32, L2-normalised, one row per chunk) + faiss.index
No pickle anywhere: every file is JSON, .npy (allow_pickle=False) or FAISS's binary format.

Memory stays bounded at any size: a loaded KB reads documents and chunks from disk by offset and
memory-maps the arrays (BM25's, the embeddings, the FAISS index), so processes serving one KB share
its pages; a build streams its inputs to disk and encodes in blocks (docs/retrieval-at-scale.md).

Writes are all-or-nothing: a build happens in a hidden sibling directory that replaces the KB
only once complete, so a build killed at any point leaves the previous KB loadable.
Under torchrun every rank calls build_kb: rank 0 reads, chunks and indexes, every rank encodes
its slice of the new chunks, and rank 0 commits only if all of them succeeded.
"""
import os
import re
import copy
import json
import time
import shutil
from array import array

import numpy as np

from nanochat.retrieval import FUSION_OPTIONS, check_options, check_retriever_name, make_retriever
from nanochat.retrieval.manifest import FORMAT_VERSION, read_manifest, sha256_file
from nanochat.retrieval.documents import chunk_document, index_text, read_documents, TOKENIZER_VERSION
from nanochat.retrieval.store import (JsonlWriter, HashSet, open_store, derive_doc_index, doc_keys, id_hash,
                                      text_hash)

BUILDABLE = ("simple", "bm25", "dense")
# 100-word chunks (DPR's passage length): ~150 tokens of prose, so a 512-token model reads the top
# three whole with room for the question (200 words each cut the third and half of the second)
DEFAULTS = dict(chunk_words=100, overlap=20, bm25_method="lucene", k1=1.5, b=0.75, index="flat")
EMPTY_SHOWN = 5   # locations of empty documents a summary lists
COPY_ROWS = 65536   # old embedding rows copied per step when adding


def _kb_files(directory):
    out = []
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        out += [os.path.relpath(os.path.join(root, n), directory) for n in sorted(names) if n != "manifest.json"]
    return out


# -----------------------------------------------------------------------------
# loading

class KB:
    """A loaded knowledge base: manifest, and documents and chunks as read-only sequences read from
    disk by offset (store.JsonlStore: len, [i], slices, iteration). Indexes load per retriever."""

    def __init__(self, directory, manifest, documents, chunks):
        self.directory, self.manifest, self.documents, self.chunks = directory, manifest, documents, chunks
        self._doc_index = None   # (docs.chunks, docs.keys), on the first lookup by id

    def doc_index(self):
        """(first chunk of each document, docs.keys.npy's hashes): mapped from disk, or for a KB
        built before they were written, made by one pass over its files."""
        if self._doc_index is None:
            paths = [os.path.join(self.directory, n) for n in ("docs.chunks.npy", "docs.keys.npy")]
            if all(os.path.exists(p) for p in paths):
                self._doc_index = tuple(np.load(p, mmap_mode="r", allow_pickle=False) for p in paths)
            else:
                self._doc_index = derive_doc_index(self.documents, self.chunks)
        return self._doc_index

    def find_document(self, doc_id):
        """Position of the document with this id in self.documents, or None."""
        keys = self.doc_index()[1]
        h = np.uint64(id_hash(doc_id))
        i = int(np.searchsorted(keys[0], h))
        while i < keys.shape[1] and keys[0, i] == h:   # equal hashes: compare the ids themselves
            position = int(keys[1, i])
            if self.documents[position].id == doc_id:
                return position
            i += 1
        return None

    def get(self, doc_id):
        """A document by id, or a chunk by its id ('doc#3'); a document wins when both match."""
        position = self.find_document(doc_id)
        if position is not None:
            return self.documents[position]
        parent, sep, number = doc_id.rpartition("#")
        position = self.find_document(parent) if sep and number.isdigit() else None
        if position is not None:
            start = self.doc_index()[0]
            i = int(start[position]) + int(number)
            if i < int(start[position + 1]) and self.chunks[i].id == doc_id:
                return self.chunks[i]
        raise KeyError(f"{self.directory}: no document or chunk with id {doc_id!r}")


def load_kb(kb_dir, verify=True):
    """Manifest + documents + chunks (read from disk when used), with every file checked against
    the manifest's sha256 (sha256 runs at ~1 GB/s, so even a million-chunk KB verifies in seconds)."""
    manifest = read_manifest(kb_dir)
    if verify:
        for name, digest in manifest["checksums"].items():
            path = os.path.join(kb_dir, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: missing from the KB; rebuild it")
            if sha256_file(path) != digest:
                raise ValueError(f"{path}: checksum mismatch (file changed since the build); rebuild the KB")
    documents, chunks = open_store(kb_dir, "docs"), open_store(kb_dir, "chunks")
    if len(documents) != manifest["num_docs"] or len(chunks) != manifest["num_chunks"]:
        raise ValueError(f"{kb_dir}/manifest.json: counts do not match docs.jsonl/chunks.jsonl; rebuild the KB")
    return KB(kb_dir, manifest, documents, chunks)


# -----------------------------------------------------------------------------
# building

def _cleanup_stale(parent, name):
    """Remove temp dirs of earlier builds of this KB whose process is gone (killed builds)."""
    for entry in os.listdir(parent):
        m = re.fullmatch(rf"\.{re.escape(name)}\.(tmp|old)-(\d+)", entry)
        if not m or int(m.group(2)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(2)), 0)
            continue  # that build is still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        if m.group(1) == "tmp":  # .old-* may be the only copy of a KB: leave it to the user
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _temp_dir(out_dir, pid):
    parent, name = os.path.split(os.path.abspath(out_dir))
    return os.path.join(parent, f".{name}.tmp-{pid}")


def _distributed():
    """(rank, world size, torch.distributed) when the caller set up a process group (kb_tools.build_kb
    under torchrun does), else (0, 1, None). torch is not imported for it."""
    import sys
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1, None
    return dist.get_rank(), dist.get_world_size(), dist


def _collective(dist, value, op):
    """One integer broadcast from rank 0 ("broadcast") or reduced to its minimum ("min")."""
    import torch
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.int64, device=device)
    if op == "broadcast":
        dist.broadcast(t, 0)
    else:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def _rank_device(world):
    """One GPU per rank under torchrun (LOCAL_RANK); otherwise sentence-transformers' own choice."""
    if world == 1:
        return None
    import torch
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else None


def _encode_share(tmp, job, rank, world, dist, show_progress):
    """Encode this rank's slice of the new chunks into tmp/dense/embeddings.npy (rows start..stop,
    made by rank 0). The slice is whole blocks of job["block"] chunks, and each block is one call to
    the encoder, so 1 or N processes encode exactly the same batches. Returns whether every rank succeeded."""
    from tqdm import tqdm
    from nanochat.retrieval import dense
    from nanochat.retrieval.store import JsonlStore
    ok = 1
    try:
        start, stop, block = job["start"], job["stop"], job["block"]
        blocks = -(-(stop - start) // block)
        mine = range(start + block * (blocks * rank // world), min(stop, start + block * (blocks * (rank + 1) // world)))
        if len(mine):
            chunks = JsonlStore(os.path.join(tmp, "chunks.jsonl"),
                                np.load(os.path.join(tmp, "chunks.offsets.npy"), mmap_mode="r", allow_pickle=False))
            emb = np.load(os.path.join(tmp, "dense", "embeddings.npy"), mmap_mode="r+", allow_pickle=False)
            model = dense.load_model(job["model"], _rank_device(world))
            desc = "encoding" if world == 1 else f"encoding (rank {rank}'s share)"
            with tqdm(total=len(mine), desc=desc, unit=" chunks", disable=not show_progress) as bar:
                for a in range(mine.start, mine.stop, block):
                    b = min(a + block, mine.stop)
                    texts = [index_text(c) for c in chunks.iter_range(a, b)]
                    emb[a:b] = dense.encode(model, texts, job["batch_size"]).reshape(b - a, emb.shape[1])
                    bar.update(b - a)
            emb.flush()
            del emb
    except BaseException:
        ok = 0
        raise
    finally:
        if world > 1:   # also on failure, so rank 0 learns of it instead of waiting
            ok = _collective(dist, ok, "min")
    return bool(ok)


def _follow_rank0(out_dir, rank, world, dist):
    """A rank other than 0: wait for rank 0 to write the chunks, encode this rank's slice, return None.
    Rank 0 broadcasts its process id (the temp dir's name), or 0 when there is nothing to encode."""
    pid = _collective(dist, 0, "broadcast")
    if pid:
        tmp = _temp_dir(out_dir, pid)
        with open(os.path.join(tmp, "encode.json"), encoding="utf-8") as f:
            job = json.load(f)
        _encode_share(tmp, job, rank, world, dist, show_progress=False)
    return None


def _write_texts(tmp, inputs, old, chunk_words, overlap, show_progress):
    """Stream the inputs into tmp/docs.jsonl and tmp/chunks.jsonl (appended to copies of the old KB's
    when adding), dropping empty texts and duplicates (same id, or same text) and chunking each
    document. Memory: one document at a time, plus ~40 bytes per document and 8 per chunk of arrays.
    Returns the counts."""
    from tqdm import tqdm
    paths = {name: os.path.join(tmp, f"{name}.jsonl") for name in ("docs", "chunks")}
    if old is not None:
        for name, path in paths.items():   # a copy: appending to the old file itself would change the old KB
            shutil.copyfile(os.path.join(old.directory, f"{name}.jsonl"), path)
        start, keys = old.doc_index()
        id_hashes = np.empty(keys.shape[1], dtype=np.uint64)
        id_hashes[keys[1].astype(np.int64)] = keys[0]   # back in document order
        id_hashes, text_hashes = array("Q", id_hashes.tobytes()), array("Q", np.asarray(keys[2]).tobytes())
        chunk_start = array("q", np.asarray(start, dtype=np.int64).tobytes())
        docs, chunks = JsonlWriter(paths["docs"], old.documents.offsets), JsonlWriter(paths["chunks"], old.chunks.offsets)
    else:
        id_hashes, text_hashes, chunk_start = array("Q"), array("Q"), array("q", [0])
        docs, chunks = JsonlWriter(paths["docs"]), JsonlWriter(paths["chunks"])
    # 64-bit hashes stand for ids and texts: two different ones collide with probability ~n^2 / 2^65
    # (1e-5 for 21M documents), and then the later document is dropped as a duplicate
    seen_ids, seen_texts = HashSet(id_hashes), HashSet(text_hashes)
    old_docs, old_chunks = len(docs), len(chunks)
    duplicates, empty, empty_sources = 0, 0, []
    for doc in tqdm(read_documents(inputs), desc="reading", unit=" docs", disable=not show_progress):
        if not doc.text.strip():
            empty += 1
            if len(empty_sources) < EMPTY_SHOWN:
                empty_sources.append(doc.metadata["source"])   # file:line, or a .txt/.md file's path
            continue
        doc_hash, content = id_hash(doc.id), text_hash(doc)
        if doc_hash in seen_ids or content in seen_texts:
            duplicates += 1
            continue
        seen_ids.add(doc_hash)
        seen_texts.add(content)
        docs.write(doc)
        id_hashes.append(doc_hash)
        text_hashes.append(content)
        for chunk in chunk_document(doc, chunk_words, overlap):
            chunks.write(chunk)
        chunk_start.append(len(chunks))
    docs.close(os.path.join(tmp, "docs.offsets.npy"))
    chunks.close(os.path.join(tmp, "chunks.offsets.npy"))
    np.save(os.path.join(tmp, "docs.chunks.npy"), np.frombuffer(chunk_start, dtype=np.int64), allow_pickle=False)
    keys = doc_keys(np.frombuffer(id_hashes, dtype=np.uint64), np.frombuffer(text_hashes, dtype=np.uint64))
    np.save(os.path.join(tmp, "docs.keys.npy"), keys, allow_pickle=False)
    return dict(docs=len(docs), new_docs=len(docs) - old_docs, duplicates=duplicates, empty=empty,
                empty_sources=empty_sources, chunks=len(chunks), new_chunks=len(chunks) - old_chunks)


def _encode_new_chunks(tmp, old, counts, model_name, batch_size, world, dist, told, show_progress, log):
    """tmp/dense/embeddings.npy: the old KB's rows copied as they are, the new chunks encoded (each
    rank its slice). Returns the embedding dimension."""
    from nanochat.retrieval import dense
    dim = dense.embedding_dim(dense.load_model(model_name, _rank_device(world)))
    n_old, n = counts["chunks"] - counts["new_chunks"], counts["chunks"]
    os.makedirs(os.path.join(tmp, "dense"))
    emb = np.lib.format.open_memmap(os.path.join(tmp, "dense", "embeddings.npy"), mode="w+", dtype=np.float32, shape=(n, dim))
    if old is not None:
        # adding: old rows are re-used as they are; only the new chunks are encoded
        old_emb = np.load(os.path.join(old.directory, "dense", "embeddings.npy"), mmap_mode="r", allow_pickle=False)
        if old_emb.shape != (n_old, dim):
            raise ValueError(f"{old.directory}/dense/embeddings.npy: shape {old_emb.shape}, expected ({n_old}, {dim}); rebuild the KB")
        for a in range(0, n_old, COPY_ROWS):
            b = min(a + COPY_ROWS, n_old)
            emb[a:b] = old_emb[a:b]
    emb.flush()
    del emb
    # 64 batches per block: big enough to keep a GPU busy, small enough to bound memory
    job = dict(model=model_name, start=n_old, stop=n, block=64 * batch_size, batch_size=batch_size)
    with open(os.path.join(tmp, "encode.json"), "w", encoding="utf-8") as f:
        json.dump(job, f)
    log(f"encoding {n - n_old:,} chunks with {model_name} (re-using {n_old:,} stored embeddings)"
        + (f", {world} processes" if world > 1 else ""))
    if world > 1:
        told["ranks"] = True
        _collective(dist, os.getpid(), "broadcast")   # the other ranks start on their slices
    if not _encode_share(tmp, job, 0, world, dist, show_progress):
        raise RuntimeError("another rank failed while encoding (its error is above); the KB is unchanged")
    os.remove(os.path.join(tmp, "encode.json"))
    return dim


def _link_or_copy_tree(src, dst):
    """A directory that never changes in place (a query encoder): hard links, or a copy across filesystems."""
    try:
        shutil.copytree(src, dst, copy_function=os.link)
    except OSError:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)


def build_kb(inputs, out_dir, retrievers=None, chunk_words=None, overlap=None, model=None, index=None,
             bm25_method=None, k1=None, b=None, add=False, batch_size=32, show_progress=True, log=print):
    """Build a KB from input files (or, with add=True, add their new documents to an existing KB).
    Parameters left as None take the defaults, or when adding, the existing KB's values; passing a
    value that contradicts the existing KB is an error (chunks and indexes must stay consistent).
    Returns a summary dict. Under torchrun (a process group set up by the caller) every rank calls
    this with the same arguments; ranks other than 0 encode their share and return None."""
    rank, world, dist = _distributed()
    if rank != 0:
        return _follow_rank0(out_dir, rank, world, dist)
    told = {"ranks": world == 1}   # the other ranks wait for one broadcast: a job, or 0 for none
    try:
        return _build(inputs, out_dir, retrievers, chunk_words, overlap, model, index, bm25_method, k1, b,
                      add, batch_size, show_progress, log, world, dist, told)
    finally:
        if not told["ranks"]:
            _collective(dist, 0, "broadcast")   # nothing to encode, or this rank failed first: the others return


def _build(inputs, out_dir, retrievers, chunk_words, overlap, model, index, bm25_method, k1, b,
           add, batch_size, show_progress, log, world, dist, told):
    from nanochat.retrieval.dense import DEFAULT_MODEL
    t0 = time.time()
    out_dir = os.path.normpath(out_dir)
    given = dict(chunk_words=chunk_words, overlap=overlap, bm25_method=bm25_method, k1=k1, b=b, index=index, model=model)
    if retrievers is not None:
        retrievers = list(retrievers)
        if "hybrid" in retrievers:  # hybrid is bm25 + dense at query time; it has no index of its own
            retrievers = [r for r in retrievers if r != "hybrid"] + ["bm25", "dense"]
        for r in retrievers:
            if r not in BUILDABLE:
                raise ValueError(f"--retrievers: unknown retriever {r!r} (choose from {', '.join(BUILDABLE)}, hybrid)")
        retrievers = [r for r in BUILDABLE if r in retrievers]
        if not retrievers:
            raise ValueError("--retrievers: empty list")

    old = None
    if add:
        old = load_kb(out_dir)
        m = old.manifest
        existing = dict(chunk_words=m["chunking"]["chunk_words"], overlap=m["chunking"]["overlap"],
                        bm25_method=m["bm25"]["method"], k1=m["bm25"]["k1"], b=m["bm25"]["b"],
                        index=(m.get("dense") or {}).get("index"), model=(m.get("dense") or {}).get("model"))
        for key, value in given.items():
            if value is not None and existing[key] is not None and value != existing[key]:
                flag = "--" + key.replace("_", "-")
                raise ValueError(f"{flag} {value} differs from the KB's {existing[key]} ({out_dir}/manifest.json); "
                                 f"rebuild without --add to change it")
        if retrievers is not None and set(retrievers) != set(m["retrievers"]):
            raise ValueError(f"--retrievers {','.join(retrievers)} differs from the KB's {','.join(m['retrievers'])}; "
                             f"rebuild without --add to change it")
        params = {k: (existing[k] if existing[k] is not None else DEFAULTS.get(k)) for k in existing}
        retrievers = list(m["retrievers"])
    else:
        params = {k: (v if v is not None else DEFAULTS.get(k)) for k, v in given.items()}
        retrievers = retrievers or list(BUILDABLE)
    params["model"] = params["model"] or DEFAULT_MODEL
    if params["chunk_words"] <= 0:
        raise ValueError(f"--chunk-words must be positive, got {params['chunk_words']}")
    if not 0 <= params["overlap"] < params["chunk_words"]:
        raise ValueError(f"--overlap must be in [0, --chunk-words), got {params['overlap']} with --chunk-words {params['chunk_words']}")
    if "dense" in retrievers:
        from nanochat.retrieval.dense import INDEX_TYPES
        if params["index"] not in INDEX_TYPES:
            raise ValueError(f"unknown dense index {params['index']!r} (choose from {', '.join(INDEX_TYPES)})")
    if os.path.exists(out_dir) and not add and not os.path.isfile(os.path.join(out_dir, "manifest.json")):
        if not os.path.isdir(out_dir) or os.listdir(out_dir):
            raise ValueError(f"--out {out_dir}: exists and is not a knowledge base; refusing to replace it")

    parent, name = os.path.split(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    _cleanup_stale(parent, name)
    tmp = _temp_dir(out_dir, os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        counts = _write_texts(tmp, inputs, old, params["chunk_words"], params["overlap"], show_progress)
        empty = counts["empty"]
        if empty and not counts["duplicates"] and not counts["new_docs"]:
            sources = counts["empty_sources"]
            raise ValueError(f"--input {' '.join(inputs)}: all {empty} documents have empty text "
                             f"({', '.join(sources)}{', ...' if empty > len(sources) else ''})")
        if not counts["new_docs"] and not add:
            raise ValueError(f"--input {' '.join(inputs)}: no documents found")
        summary = dict(out=out_dir, docs=counts["docs"], new_docs=counts["new_docs"], duplicates=counts["duplicates"],
                       empty=empty, empty_sources=counts["empty_sources"], chunks=counts["chunks"],
                       new_chunks=counts["new_chunks"])
        if not counts["new_docs"]:
            log(f"nothing to add to {out_dir}: all {counts['duplicates']} input documents are already in it"
                + (f" ({empty} more had empty text)" if empty else ""))
            return dict(summary, chunks=len(old.chunks), seconds=time.time() - t0)
        manifest = {
            "format_version": FORMAT_VERSION,
            "created_with": "nanochat-rag kb_tools.build_kb",
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "retrievers": retrievers,
            "num_docs": counts["docs"],
            "num_chunks": counts["chunks"],
            "chunking": {"chunk_words": params["chunk_words"], "overlap": params["overlap"]},
            "tokenizer": TOKENIZER_VERSION,
            "bm25": {"method": params["bm25_method"], "k1": params["k1"], "b": params["b"]},
        }
        if "dense" in retrievers:
            # before BM25, so the other ranks are released as early as possible
            dim = _encode_new_chunks(tmp, old, counts, params["model"], batch_size, world, dist, told, show_progress, log)
            manifest["dense"] = {"model": params["model"], "dim": dim, "index": params["index"]}
        chunks = open_store(tmp, "chunks")
        if "bm25" in retrievers:
            from nanochat.retrieval.bm25 import index_to_disk
            log(f"indexing {len(chunks):,} chunks with bm25s")
            index_to_disk(chunks, os.path.join(tmp, "bm25"), os.path.join(tmp, "bm25.tokens"), method=params["bm25_method"],
                          k1=params["k1"], b=params["b"], show_progress=show_progress)
        if "dense" in retrievers:
            from nanochat.retrieval import dense
            emb = np.load(os.path.join(tmp, "dense", "embeddings.npy"), mmap_mode="r", allow_pickle=False)
            log(f"building the {params['index']} index of {len(emb):,} vectors")
            dense.save_index(emb, params["index"], os.path.join(tmp, "dense", "faiss.index"))
            del emb
            if old is not None and old.manifest.get("query_encoder"):
                # the tuned query encoder stays: new documents are embedded by the base model, as the old ones were
                encoder = old.manifest["query_encoder"]
                _link_or_copy_tree(os.path.join(out_dir, encoder["dir"]), os.path.join(tmp, encoder["dir"]))
                manifest["query_encoder"] = encoder
        manifest["checksums"] = {f: sha256_file(os.path.join(tmp, f)) for f in _kb_files(tmp)}
        with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
        # the swap: two renames on the same filesystem; the old KB is deleted only after the new one is in place
        if os.path.exists(out_dir):
            old_dir = os.path.join(parent, f".{name}.old-{os.getpid()}")
            os.rename(out_dir, old_dir)
            os.rename(tmp, out_dir)
            shutil.rmtree(old_dir)
        else:
            os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dict(summary, retrievers=retrievers, seconds=time.time() - t0)


# -----------------------------------------------------------------------------
# serving

def augment_conversation(retriever, conversation, top_k, query=None):
    """A new conversation (deep copy, every other key kept) with a
    {"role": "retrieval", "documents": [...]} message right before the last user message.
    The query defaults to that user message's text."""
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(messages, list):
        raise ValueError("augment_conversation: conversation must be a dict with a 'messages' list")
    users = [i for i, msg in enumerate(messages) if msg.get("role") == "user"]
    if not users:
        raise ValueError("augment_conversation: conversation has no user message")
    at = users[-1]
    if at > 0 and messages[at - 1].get("role") == "retrieval":
        raise ValueError("augment_conversation: the last user message already has a retrieval message before it")
    if query is None:
        content = messages[at]["content"]
        query = content if isinstance(content, str) else " ".join(p.get("text", "") for p in content)
    results = retriever.search(query, top_k)
    out = copy.deepcopy(conversation)
    out["messages"].insert(at, {"role": "retrieval", "documents": [r.document.to_dict() for r in results]})
    return out


class RetrievalManager:
    """Serves one retriever over a KB directory built by kb_tools.build_kb.
    Results are chunks (Documents whose metadata["doc_id"] names the parent document)."""

    def __init__(self, kb_dir, retriever="bm25", query_encoder="tuned", **options):
        """query_encoder (dense and hybrid): "tuned" serves queries with the KB's trained query
        encoder when it has one (scripts/retriever_train.py), "base" with the model the documents
        were embedded with."""
        check_retriever_name(retriever)
        if query_encoder not in ("tuned", "base"):
            raise ValueError(f"query_encoder must be 'tuned' or 'base', got {query_encoder!r}")
        self.query_encoder_choice = query_encoder
        self.kb = kb = load_kb(kb_dir)
        self.kb_dir, self.retriever_name = kb_dir, retriever
        built = kb.manifest["retrievers"]
        lexical = options.pop("lexical", "bm25") if retriever == "hybrid" else None
        needed = {"hybrid": [lexical, "dense"]}.get(retriever, [retriever])
        for r in needed:
            if r not in built:
                raise ValueError(f"{kb_dir}: retriever {r!r} was not built for this KB (built: {', '.join(built)}); "
                                 f"rebuild with `python -m kb_tools.build_kb --retrievers {','.join(sorted(set(built) | set(needed)))}`")
        dense_load = ("device", "ef_search", "nprobe", "batch_size", "mmap", "model")
        allowed = {"simple": (), "bm25": ("mmap",), "dense": dense_load,
                   "hybrid": dense_load + FUSION_OPTIONS}[retriever]
        check_options(retriever, options, allowed)
        if kb.manifest.get("tokenizer") != TOKENIZER_VERSION and any(r in ("simple", "bm25") for r in needed):
            raise ValueError(f"{kb_dir}/manifest.json: built with tokenizer {kb.manifest.get('tokenizer')!r}, "
                             f"this code uses {TOKENIZER_VERSION!r}; rebuild the KB")
        self.query_encoder = None   # dense and hybrid: "tuned" when the KB's trained encoder serves queries, else "base"
        self.retriever = self._open(retriever, options, lexical)

    def _open(self, name, options, lexical=None):
        kb, m = self.kb, self.kb.manifest
        # memory-mapped by default: pages are read as searches touch them and shared by every
        # process serving the KB (mmap=False reads BM25's arrays, embeddings and index into RAM)
        mmap = options.pop("mmap", True)
        if name == "simple":
            return make_retriever("simple", kb.chunks, k1=m["bm25"]["k1"], b=m["bm25"]["b"])
        if name == "bm25":
            from nanochat.retrieval.bm25 import BM25Retriever
            return BM25Retriever.load(os.path.join(kb.directory, "bm25"), kb.chunks, mmap=mmap)
        if name == "dense":
            from nanochat.retrieval import dense
            from nanochat.retrieval.query_encoder import encoder_path, load_encoder
            model = options.pop("model", m["dense"]["model"])
            if model != m["dense"]["model"]:
                raise ValueError(f"{kb.directory}: KB embeddings were made with model {m['dense']['model']!r}, "
                                 f"not {model!r}; query with the same model or rebuild the KB")
            tuned = encoder_path(kb.directory, m) if self.query_encoder_choice == "tuned" else None
            self.query_encoder = "tuned" if tuned else "base"
            query_model = load_encoder(tuned, options.get("device")) if tuned else None
            r = dense.DenseRetriever.load(os.path.join(kb.directory, "dense"), kb.chunks, model=model,
                                          index=m["dense"]["index"], mmap=mmap, query_model=query_model, **options)
            if r.dim != m["dense"]["dim"]:
                raise ValueError(f"{kb.directory}: model {model!r} gives dimension {r.dim}, the KB has {m['dense']['dim']}")
            return r
        from nanochat.retrieval.hybrid import HybridRetriever
        fusion = {k: options.pop(k) for k in FUSION_OPTIONS if k in options}
        return HybridRetriever(self._open(lexical, {"mmap": mmap}), self._open("dense", dict(options, mmap=mmap)), **fusion)

    @property
    def documents(self):
        return self.kb.documents

    @property
    def chunks(self):
        return self.kb.chunks

    def get(self, doc_id):
        """A document by id (a chunk id like 'doc#3' also works)."""
        return self.kb.get(doc_id)

    def has_document(self, doc_id):
        return self.kb.find_document(doc_id) is not None

    def search(self, query, top_k):
        return self.retriever.search(query, top_k)

    def search_batch(self, queries, top_k):
        return self.retriever.search_batch(queries, top_k)

    def augment_conversation(self, conversation, top_k, query=None):
        return augment_conversation(self.retriever, conversation, top_k, query)
