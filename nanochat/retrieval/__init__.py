"""
Retrieval for nanochat-rag: documents, four retrievers, knowledge bases on disk.

    from nanochat.retrieval import Document, make_retriever, RetrievalManager
    r = make_retriever("bm25", [Document("a", "Paris", "Paris is the capital of France.")])
    r.search("capital of France", top_k=3)            # -> [SearchResult(document, score), ...]
    kb = RetrievalManager("kb/wiki", retriever="hybrid")
    kb.augment_conversation({"messages": [...]}, top_k=3)

Retrievers: simple (stdlib BM25), bm25 (bm25s), dense (sentence-transformers + FAISS),
hybrid (BM25 + dense fused). make_retriever works in memory only; KBs are built by
`python -m kb_tools.build_kb` and loaded by RetrievalManager / load_kb.
"""
from nanochat.retrieval.documents import Document, SearchResult, tokenize, chunk_document
from nanochat.retrieval.base import Retriever

RETRIEVERS = ("simple", "bm25", "dense", "hybrid")
# options each retriever accepts; anything else is a user error, not a silent no-op
LEXICAL_OPTIONS = {"simple": ("k1", "b"), "bm25": ("method", "k1", "b", "idf_method")}
DENSE_OPTIONS = ("model", "index", "batch_size", "device", "ef_search", "nprobe", "show_progress", "embeddings")
FUSION_OPTIONS = ("fusion", "alpha", "candidates", "rerank", "rerank_depth")


def check_options(retriever, options, allowed):
    for key in options:
        if key not in allowed:
            raise ValueError(f"option {key!r} does not apply to retriever {retriever!r} "
                             f"(it takes: {', '.join(sorted(allowed)) or 'no options'})")


def check_retriever_name(name):
    if name not in RETRIEVERS:
        raise ValueError(f"unknown retriever {name!r} (choose from {', '.join(RETRIEVERS)})")


def make_retriever(name, documents, **options):
    """An in-memory retriever over `documents` (no disk). simple/bm25 on 20 short documents
    build in about a millisecond; dense encodes every document (the model is loaded once per process).
    hybrid takes `lexical="bm25"|"simple"` plus that retriever's, dense's and the fusion options."""
    check_retriever_name(name)
    documents = list(documents)
    for i, doc in enumerate(documents):
        if not isinstance(doc, Document):
            raise TypeError(f"documents[{i}] is a {type(doc).__name__}, not a Document")
    if name == "simple":
        from nanochat.retrieval.simple import SimpleBM25
        check_options(name, options, LEXICAL_OPTIONS["simple"])
        return SimpleBM25(documents, **options)
    if name == "bm25":
        from nanochat.retrieval.bm25 import BM25Retriever
        check_options(name, options, LEXICAL_OPTIONS["bm25"])
        return BM25Retriever(documents, **options)
    from nanochat.retrieval.dense import DenseRetriever
    if name == "dense":
        check_options(name, options, DENSE_OPTIONS)
        return DenseRetriever(documents, **options)
    from nanochat.retrieval.hybrid import HybridRetriever
    lexical = options.pop("lexical", "bm25")
    if lexical not in LEXICAL_OPTIONS:
        raise ValueError(f"hybrid: lexical must be 'bm25' or 'simple', got {lexical!r}")
    check_options(name, options, LEXICAL_OPTIONS[lexical] + DENSE_OPTIONS + FUSION_OPTIONS)
    pick = lambda keys: {k: v for k, v in options.items() if k in keys}
    return HybridRetriever(make_retriever(lexical, documents, **pick(LEXICAL_OPTIONS[lexical])),
                           make_retriever("dense", documents, **pick(DENSE_OPTIONS)),
                           **pick(FUSION_OPTIONS))


def __getattr__(name):
    # KBs need numpy (store.py); imported on first use so that `simple` stays standard-library only
    if name in ("RetrievalManager", "load_kb", "augment_conversation"):
        from nanochat.retrieval import kb
        return getattr(kb, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Document", "SearchResult", "Retriever", "RetrievalManager", "make_retriever", "load_kb",
           "augment_conversation", "tokenize", "chunk_document", "RETRIEVERS"]
