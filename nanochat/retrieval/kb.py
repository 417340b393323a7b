"""
Knowledge bases on disk, and the RetrievalManager that serves one.

A KB is a directory:
    manifest.json     format version, created-with, retrievers built, chunking, BM25 params,
                      embedding model + dimension + index type, doc/chunk counts, sha256 of every file
    docs.jsonl        the documents, one JSON object per line
    chunks.jsonl      the chunks that are actually indexed (metadata.doc_id names the parent)
    bm25/             bm25s's own saved index (.npy + JSON)
    dense/            embeddings.npy (float32, L2-normalised, one row per chunk) + faiss.index
No pickle anywhere: every file is JSON, .npy (allow_pickle=False) or FAISS's binary format.

Writes are all-or-nothing: a build happens in a hidden sibling directory that replaces the KB
only once complete, so a build killed at any point leaves the previous KB loadable.
"""
import os
import re
import copy
import json
import time
import shutil

from nanochat.retrieval import FUSION_OPTIONS, check_options, check_retriever_name, make_retriever
from nanochat.retrieval.manifest import FORMAT_VERSION, read_manifest, sha256_file
from nanochat.retrieval.documents import Document, chunk_document, content_key, index_text, read_documents, TOKENIZER_VERSION

BUILDABLE = ("simple", "bm25", "dense")
# 100-word chunks (DPR's passage length): ~150 tokens of prose, so a 512-token model reads the top
# three whole with room for the question (200 words each cut the third and half of the second)
DEFAULTS = dict(chunk_words=100, overlap=20, bm25_method="lucene", k1=1.5, b=0.75, index="flat")
EMPTY_SHOWN = 5   # locations of empty documents a summary lists


# -----------------------------------------------------------------------------
# small file helpers

def _write_jsonl(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc.to_json(), ensure_ascii=False) + "\n")


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [Document.from_json(json.loads(line)) for line in f]


def _kb_files(directory):
    out = []
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        out += [os.path.relpath(os.path.join(root, n), directory) for n in sorted(names) if n != "manifest.json"]
    return out


# -----------------------------------------------------------------------------
# loading

class KB:
    """A loaded knowledge base: manifest, documents and chunks (indexes load per retriever)."""

    def __init__(self, directory, manifest, documents, chunks):
        self.directory, self.manifest, self.documents, self.chunks = directory, manifest, documents, chunks


def load_kb(kb_dir, verify=True):
    """Manifest + documents + chunks, with every file checked against the manifest's sha256
    (sha256 runs at ~1 GB/s, so even a million-chunk KB verifies in seconds)."""
    manifest = read_manifest(kb_dir)
    if verify:
        for name, digest in manifest["checksums"].items():
            path = os.path.join(kb_dir, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: missing from the KB; rebuild it")
            if sha256_file(path) != digest:
                raise ValueError(f"{path}: checksum mismatch (file changed since the build); rebuild the KB")
    documents = _read_jsonl(os.path.join(kb_dir, "docs.jsonl"))
    chunks = _read_jsonl(os.path.join(kb_dir, "chunks.jsonl"))
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


def build_kb(inputs, out_dir, retrievers=None, chunk_words=None, overlap=None, model=None, index=None,
             bm25_method=None, k1=None, b=None, add=False, batch_size=32, show_progress=True, log=print):
    """Build a KB from input files (or, with add=True, add their new documents to an existing KB).
    Parameters left as None take the defaults, or when adding, the existing KB's values; passing a
    value that contradicts the existing KB is an error (chunks and indexes must stay consistent).
    Returns a summary dict."""
    from nanochat.retrieval.dense import DEFAULT_MODEL
    from tqdm import tqdm
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
    if os.path.exists(out_dir) and not add and not os.path.isfile(os.path.join(out_dir, "manifest.json")):
        if not os.path.isdir(out_dir) or os.listdir(out_dir):
            raise ValueError(f"--out {out_dir}: exists and is not a knowledge base; refusing to replace it")

    # read, drop empty texts (a big collection often has a few; search engines index the rest),
    # de-duplicate (same id, or same text) and chunk
    documents = list(old.documents) if old else []
    seen_ids = {d.id for d in documents}
    seen_content = {content_key(d) for d in documents}
    new_docs, dropped, empty = [], 0, []
    for doc in tqdm(read_documents(inputs), desc="reading", unit=" docs", disable=not show_progress):
        if not doc.text.strip():
            empty.append(doc.metadata["source"])   # file:line, or a .txt/.md file's path
            continue
        key = content_key(doc)
        if doc.id in seen_ids or key in seen_content:
            dropped += 1
            continue
        seen_ids.add(doc.id)
        seen_content.add(key)
        new_docs.append(doc)
    if empty and not dropped and not new_docs:
        raise ValueError(f"--input {' '.join(inputs)}: all {len(empty)} documents have empty text "
                         f"({', '.join(empty[:EMPTY_SHOWN])}{', ...' if len(empty) > EMPTY_SHOWN else ''})")
    if not new_docs and not add:
        raise ValueError(f"--input {' '.join(inputs)}: no documents found")
    dropped_empty = dict(empty=len(empty), empty_sources=empty[:EMPTY_SHOWN])
    if not new_docs:
        summary = dict(out=out_dir, docs=len(documents), new_docs=0, duplicates=dropped, **dropped_empty,
                       chunks=len(old.chunks), new_chunks=0, seconds=time.time() - t0)
        log(f"nothing to add to {out_dir}: all {dropped} input documents are already in it"
            + (f" ({len(empty)} more had empty text)" if empty else ""))
        return summary
    chunks = list(old.chunks) if old else []
    new_chunks = []
    for doc in tqdm(new_docs, desc="chunking", unit=" docs", disable=not show_progress):
        new_chunks += chunk_document(doc, params["chunk_words"], params["overlap"])
    documents += new_docs
    chunks += new_chunks

    parent, name = os.path.split(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    _cleanup_stale(parent, name)
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        _write_jsonl(os.path.join(tmp, "docs.jsonl"), documents)
        _write_jsonl(os.path.join(tmp, "chunks.jsonl"), chunks)
        manifest = {
            "format_version": FORMAT_VERSION,
            "created_with": "nanochat-rag kb_tools.build_kb",
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "retrievers": retrievers,
            "num_docs": len(documents),
            "num_chunks": len(chunks),
            "chunking": {"chunk_words": params["chunk_words"], "overlap": params["overlap"]},
            "tokenizer": TOKENIZER_VERSION,
            "bm25": {"method": params["bm25_method"], "k1": params["k1"], "b": params["b"]},
        }
        if "bm25" in retrievers:
            from nanochat.retrieval.bm25 import BM25Retriever
            log(f"indexing {len(chunks):,} chunks with bm25s")
            BM25Retriever(chunks, method=params["bm25_method"], k1=params["k1"], b=params["b"]).save(os.path.join(tmp, "bm25"))
        if "dense" in retrievers:
            import numpy as np
            from nanochat.retrieval import dense
            retriever_model = dense.load_model(params["model"])
            dim = dense.embedding_dim(retriever_model)
            if old is not None:
                # adding: old rows are re-used as they are; only the new chunks are encoded
                old_emb = np.load(os.path.join(out_dir, "dense", "embeddings.npy"), allow_pickle=False)
            else:
                old_emb = np.zeros((0, dim), dtype=np.float32)
            log(f"encoding {len(new_chunks):,} chunks with {params['model']} (re-using {len(old_emb):,} stored embeddings)")
            new_emb = dense.encode(retriever_model, [index_text(c) for c in new_chunks], batch_size, show_progress)
            emb = np.concatenate([old_emb, new_emb.reshape(len(new_chunks), dim)])
            dense.DenseRetriever(chunks, model=params["model"], index=params["index"], embeddings=emb).save(os.path.join(tmp, "dense"))
            manifest["dense"] = {"model": params["model"], "dim": dim, "index": params["index"]}
            if old is not None and old.manifest.get("query_encoder"):
                # the tuned query encoder stays: new documents are embedded by the base model, as the old ones were
                encoder = old.manifest["query_encoder"]
                shutil.copytree(os.path.join(out_dir, encoder["dir"]), os.path.join(tmp, encoder["dir"]))
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
    summary = dict(out=out_dir, docs=len(documents), new_docs=len(new_docs), duplicates=dropped, **dropped_empty,
                   chunks=len(chunks), new_chunks=len(new_chunks), retrievers=retrievers, seconds=time.time() - t0)
    return summary


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
        self._by_id = None  # id -> document or chunk, built on the first get()
        self.query_encoder = None   # dense and hybrid: "tuned" when the KB's trained encoder serves queries, else "base"
        self.retriever = self._open(retriever, options, lexical)

    def _open(self, name, options, lexical=None):
        kb, m = self.kb, self.kb.manifest
        mmap = options.pop("mmap", False)
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
        if self._by_id is None:
            self._by_id = {c.id: c for c in self.kb.chunks}
            self._by_id.update({d.id: d for d in self.kb.documents})
        if doc_id not in self._by_id:
            raise KeyError(f"{self.kb_dir}: no document or chunk with id {doc_id!r}")
        return self._by_id[doc_id]

    def search(self, query, top_k):
        return self.retriever.search(query, top_k)

    def search_batch(self, queries, top_k):
        return self.retriever.search_batch(queries, top_k)

    def augment_conversation(self, conversation, top_k, query=None):
        return augment_conversation(self.retriever, conversation, top_k, query)
