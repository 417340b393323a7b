"""
Documents, search results, the word tokenizer every lexical retriever shares, chunking,
and reading the input files a knowledge base is built from.

Everything here is standard library only, so the `simple` retriever stays dependency-free.
"""
import os
import re
import json
import hashlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping


def _freeze(value):
    """Read-only deep copy: dicts become mapping proxies, lists tuples, so nothing reachable
    from a stored document can be changed in place."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value):
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def _frozen_mapping(value=None):
    return _freeze(dict(value or {}))


@dataclass(frozen=True)
class Document:
    """One document, or one chunk of a document (then metadata["doc_id"] names its parent).
    Frozen, with a read-only metadata view: retrievers hand out the same objects to every
    caller, so nothing downstream may be able to change what the next query sees."""
    id: str
    title: str
    text: str
    metadata: Mapping = field(default_factory=_frozen_mapping, hash=False)

    def __post_init__(self):
        # copy the caller's dict: mutating it afterwards must not reach the stored document
        object.__setattr__(self, "metadata", _frozen_mapping(self.metadata))

    @property
    def doc_id(self):
        return self.metadata.get("doc_id", self.id)

    def to_dict(self):
        """The exact form a document takes inside a chat conversation's retrieval message."""
        return {"id": self.id, "title": self.title, "text": self.text}

    def to_json(self):
        return {"id": self.id, "title": self.title, "text": self.text, "metadata": _thaw(self.metadata)}

    @classmethod
    def from_json(cls, obj):
        return cls(id=obj["id"], title=obj.get("title", ""), text=obj["text"], metadata=obj.get("metadata") or {})


@dataclass(frozen=True)
class SearchResult:
    """A fresh (document, score) pair per query; the score lives here, never on the document."""
    document: Document
    score: float


# -----------------------------------------------------------------------------
# Tokenizer shared by `simple` and `bm25`, so the two agree token for token.
# Lowercased \w+ runs (keeps numbers, codes like e4021 and snake_case names whole),
# minus the Lucene English stopword list (the one bm25s uses for stopwords="en").

TOKENIZER_VERSION = "w+-lower-stop-en-1"  # recorded in the manifest; bump when the rules change
TOKEN_RE = re.compile(r"\w+")
STOPWORDS_EN = frozenset("""
a an and are as at be but by for if in into is it no not of on or such
that the their then there these they this to was will with
""".split())


def tokenize(text):
    return [t for t in TOKEN_RE.findall(text.lower()) if t not in STOPWORDS_EN]


def index_text(doc):
    """What every retriever indexes: the title often names the topic the body never repeats."""
    return f"{doc.title}\n{doc.text}" if doc.title else doc.text


# -----------------------------------------------------------------------------
# Chunking

WORD_RE = re.compile(r"\S+")


def chunk_document(doc, chunk_words, overlap):
    """Split a document into chunks of `chunk_words` whitespace words, consecutive chunks
    sharing `overlap` words. Chunk text is a slice of the original text (spacing kept). Only
    the current window of word offsets is held, so a 50 MB document never becomes millions
    of word strings."""
    if chunk_words <= 0:
        raise ValueError(f"--chunk-words must be positive, got {chunk_words}")
    if not 0 <= overlap < chunk_words:
        raise ValueError(f"--overlap must be in [0, --chunk-words), got {overlap} with --chunk-words {chunk_words}")
    step = chunk_words - overlap
    text = doc.text
    pieces = []
    window = []  # start offsets of the words in the chunk being filled
    for m in WORD_RE.finditer(text):
        if len(window) == chunk_words:
            pieces.append(text[window[0]:m.start()].rstrip())
            window = window[step:]
        window.append(m.start())
    # after every emitted chunk at least one new word was appended, so the tail is never redundant
    pieces.append(text[window[0]:].rstrip() if window else "")
    return [Document(id=f"{doc.id}#{i}", title=doc.title, text=piece, metadata=dict(doc.metadata, doc_id=doc.id, chunk=i))
            for i, piece in enumerate(pieces)]


# -----------------------------------------------------------------------------
# Reading inputs: .jsonl ({"id", "title", "text"}), .txt, .md, .parquet (a `text` column, as
# pretraining shards have; `id`/`title` columns when present), or directories of them.
# Every problem is a ValueError whose message starts with file:line. A document with empty
# text is no problem here: it is yielded like any other, and build_kb drops and counts it.

INPUT_EXTENSIONS = (".jsonl", ".txt", ".md", ".parquet")


def list_input_files(paths):
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = []
            for root, dirs, names in os.walk(path):
                dirs.sort()
                found += [os.path.join(root, n) for n in sorted(names) if n.endswith(INPUT_EXTENSIONS)]
            if not found:
                raise ValueError(f"{path}: directory has no {', '.join(INPUT_EXTENSIONS)} files")
            files += found
        elif os.path.isfile(path):
            if not path.endswith(INPUT_EXTENSIONS):
                raise ValueError(f"{path}: unsupported input type (expected {', '.join(INPUT_EXTENSIONS)} or a directory)")
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: input not found")
    return files


def _decode_line(raw, path, lineno):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start} of the line)") from None


def _read_jsonl(path):
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode_line(raw, path, lineno).strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object with id, title, text")
            for key in ("id", "text"):
                if key not in obj:
                    raise ValueError(f"{path}:{lineno}: missing {key!r}")
            if not isinstance(obj["text"], str) or not isinstance(obj.get("title", ""), str):
                raise ValueError(f"{path}:{lineno}: 'title' and 'text' must be strings")
            if not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool) or str(obj["id"]) == "":
                raise ValueError(f"{path}:{lineno}: 'id' must be a non-empty string or integer")
            metadata = {k: v for k, v in obj.items() if k not in ("id", "title", "text")}
            metadata["source"] = f"{path}:{lineno}"
            yield Document(id=str(obj["id"]), title=obj.get("title", ""), text=obj["text"], metadata=metadata)


def _read_parquet(path):
    """One document per row; id: the `id` column, else `<file name>:<row>` (rows count from 1, like lines)."""
    import pyarrow.parquet as pq
    try:
        table = pq.read_table(path)
    except Exception as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    if "text" not in table.column_names:
        raise ValueError(f"{path}: no 'text' column (columns: {', '.join(table.column_names)})")
    texts = table.column("text").to_pylist()
    ids = table.column("id").to_pylist() if "id" in table.column_names else None
    titles = table.column("title").to_pylist() if "title" in table.column_names else None
    for row, text in enumerate(texts, 1):
        if not isinstance(text, str):
            raise ValueError(f"{path}:{row}: 'text' must be a string")
        doc_id = str(ids[row - 1]) if ids else f"{os.path.basename(path)}:{row}"
        yield Document(id=doc_id, title=(titles[row - 1] or "") if titles else "", text=text,
                       metadata={"source": f"{path}:{row}"})


def _read_text_file(path, root):
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{lineno}: not valid UTF-8") from None
    # the id is the path relative to the directory given on the command line, so it is stable
    doc_id = os.path.relpath(path, root) if root else os.path.basename(path)
    title = os.path.splitext(os.path.basename(path))[0]
    if path.endswith(".md"):
        heading = re.search(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.MULTILINE)
        if heading:
            title = heading.group(1)
    return Document(id=doc_id, title=title, text=text, metadata={"source": path})


def read_documents(paths):
    """Yield Documents from files and directories, in a stable order."""
    for path in paths:
        root = path if os.path.isdir(path) else None
        for file in list_input_files([path]):
            if file.endswith(".jsonl"):
                yield from _read_jsonl(file)
            elif file.endswith(".parquet"):
                yield from _read_parquet(file)
            else:
                yield _read_text_file(file, root)


def content_key(doc):
    """Two documents with the same text are duplicates whatever their ids and titles
    (a .txt file's title is its file name, so copies of one file differ only there)."""
    return hashlib.sha1(doc.text.strip().encode("utf-8")).hexdigest()
