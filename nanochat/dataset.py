"""
Pretraining text sources, each addressable by document index (so a run resumes exactly and
torchrun ranks take disjoint documents without coordination). Text generated on the fly
("embedded", "reading", "recall") is made in tasks/ (tasks.pretraining) and handed in by the scripts:

- "embedded": the offline default. Generated on the fly by tasks.knowledge_world: encyclopedia
  articles about invented entities followed by questions answered from them. License-clean,
  never repeats, needs no download.
- "realtext": real English already on the machine, read at run time, never committed: docstrings of
  the stdlib and installed packages (parsed with ast, never imported) and README/NEWS/.txt files of
  /usr/share/doc. Man pages (/usr/share/man), /usr/share/iso-codes, /etc/services and the
  http.HTTPStatus / errno tables are never read: they are held out to evaluate zero-shot reading of
  real documents.
- "reading": generated reading drills (tasks.reading) as plain text: documents of many shapes with
  real-English schemas, each followed by questions answered from it.
- "recall": key -> value recall drills (tasks.recall), e.g. mixed in as "embedded:1+recall:1".
- "fineweb": FineWeb-Edu parquet shards for users who are online
  (`python -m nanochat.dataset -n 8` downloads 8 shards). The last shard is the validation split.
- a mix such as "embedded:3+realtext:1" (or "embedded+realtext", equal parts) interleaves sources
  document by document, e.g. to keep the knowledge-world reading drills and add real English.
"""
import os
import re
import ast
import gzip
import json
import math
import time
import hashlib
import multiprocessing
import argparse
import warnings
import sysconfig
from fractions import Fraction

from nanochat.common import get_base_dir, atomic_write_text, print0

FINEWEB_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_{:05d}.parquet"
FINEWEB_MAX_SHARD = 1822


class GeneratedSource:
    """Text made on the fly: document i is document(i, split), a pure function, so any document can
    be made without the ones before it. The generators live in tasks/ (tasks.pretraining.GENERATED:
    the knowledge world's articles, the reading drills); scripts hand them to get_source, so this
    library never imports the task layer."""

    def __init__(self, name, document, split="train"):
        self.name, self._document, self.split = name, document, split

    def __len__(self):
        return 10 ** 9   # effectively endless

    def get(self, i):
        return self._document(i, self.split)


class ParquetSource:
    """Documents in a directory of parquet files with a `text` column, indexed across files."""
    name = "parquet"

    def __init__(self, data_dir, split="train"):
        import pyarrow.parquet as pq
        if not os.path.isdir(data_dir):
            raise FileNotFoundError(f"no parquet directory {data_dir} (download shards: python -m nanochat.dataset -n 8)")
        files = sorted(os.path.join(data_dir, f) for f in os.listdir(data_dir) if f.endswith(".parquet"))
        if len(files) < 2:
            raise ValueError(f"{data_dir} needs at least 2 parquet files (the last one is the validation split), found {len(files)}")
        files = files[-1:] if split == "val" else files[:-1]
        self.groups = []   # (file, row_group, first_doc_index, num_rows)
        total = 0
        for path in files:
            try:
                meta = pq.ParquetFile(path).metadata
            except Exception as e:
                raise ValueError(f"{path}: not a readable parquet file ({e})") from None
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                self.groups.append((path, g, total, n))
                total += n
        if total == 0:
            raise ValueError(f"{data_dir}: the {split} parquet files hold no documents")
        self.total = total
        self._cached = (None, None)

    def __len__(self):
        return self.total

    def get(self, i):
        import bisect
        import pyarrow.parquet as pq
        i %= self.total   # wrap around: more epochs
        k = bisect.bisect_right([g[2] for g in self.groups], i) - 1
        path, g, first, _ = self.groups[k]
        if self._cached[0] != (path, g):
            table = pq.ParquetFile(path).read_row_group(g, columns=["text"])
            self._cached = ((path, g), table.column("text").to_pylist())
        return self._cached[1][i - first]


# ---- real English text, found on the machine ---------------------------------------------------
# Read at run time for training only and never written into the repo: these texts keep their own
# licences (the Python licence, each package's and each Debian package's), which is why nothing of
# them is committed; the cache below lives under $NANOCHAT_BASE_DIR (or $NANOCHAT_REALTEXT_CACHE).
REALTEXT_MAX_CHARS = 50_000_000   # collected per split at most (the val split gets 1/REALTEXT_VAL_EVERY of it)
REALTEXT_VAL_EVERY = 50           # 1 file in 50, by a hash of its path, is validation
REALTEXT_MIN_WORDS = 20           # shorter docstrings ("Return self.") teach nothing
REALTEXT_DOC_CHARS = 4000         # long texts are cut into documents of about this size at paragraph breaks
REALTEXT_MAX_FILE_BYTES = 1_000_000   # bigger files are generated tables, not prose
REALTEXT_FORMAT = 1               # bump when the filters change: old caches are then ignored
SKIP_DIRS = {"test", "tests", "testing", "idle_test", "__pycache__", "site-packages", "dist-packages",
             "_vendor", "vendor", "vendored", "_vendored"}   # tests are code, vendored copies are duplicates
# held-out evaluation sources ("zero-shot reading of real documents") must never become training text
HELD_OUT_DIRS = {"man", "iso-codes", "manpages", "manpages-dev", "man-db", "git-man"}
HELD_OUT_WORDS = ("errno", "errorref", "status")   # files named so hold status and error-code tables
HELD_OUT_FILES = {"http/__init__.py"}               # the stdlib's http.HTTPStatus
COMMON_WORDS = set("the a an of to in is are be and or for this that it with as by on not if from".split())
WORD = re.compile(r"[(\"'`]?[A-Za-z]+(?:'[a-z]+)?[)\"'`]?[.,;:!?]?[)\"'`]?")


def default_roots():
    """Where the text comes from unless told: $NANOCHAT_REALTEXT_ROOTS (dirs joined by os.pathsep), else the
    stdlib, this environment's site-packages and /usr/share/doc."""
    env = os.environ.get("NANOCHAT_REALTEXT_ROOTS")
    if env:
        return [r for r in env.split(os.pathsep) if r]
    paths = sysconfig.get_paths()
    roots = [paths["stdlib"], paths["purelib"], paths["platlib"], "/usr/share/doc"]
    return [r for k, r in enumerate(roots) if os.path.isdir(r) and r not in roots[:k]]


def is_val_file(relpath):
    # a hash of the path below its root, so the split is the same on every machine and every run
    return int(hashlib.md5(relpath.encode("utf-8")).hexdigest()[:8], 16) % REALTEXT_VAL_EVERY == 0


def man_page_names(man_dir="/usr/share/man"):
    """Names of the installed man pages (file names only, never their text): a doc file named like one,
    such as git/contrib/subtree/git-subtree.txt, is that page's source and stays held out too."""
    names = set()
    for section in sorted(os.listdir(man_dir)) if os.path.isdir(man_dir) else []:
        if section.startswith("man") and os.path.isdir(os.path.join(man_dir, section)):
            names.update(f.split(".")[0] for f in os.listdir(os.path.join(man_dir, section)))
    return names


def is_doc_file(name):
    """README, NEWS and .txt files (also gzipped); licences and changelogs are repetitive lists, not prose."""
    name = name.lower().removesuffix(".gz")
    if name.startswith(("copyright", "changelog", "license", "licence", "copying")):
        return False
    if name.endswith((".html", ".htm", ".xml", ".ps", ".pdf", ".css", ".js", ".json", ".py", ".el")):
        return False
    return name.startswith(("readme", "news")) or name.endswith(".txt")


def walk_files(roots):
    """(root, path below the root, full path) of every file worth reading, in sorted order."""
    seen, man_pages = set(), man_page_names()
    for root in roots:
        if HELD_OUT_DIRS & set(os.path.abspath(root).split(os.sep)):
            raise ValueError(f"realtext: {root} is a held-out evaluation source, never training text")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS
                                 and d not in HELD_OUT_DIRS and not d.endswith((".dist-info", ".egg-info")))
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, root)
                if any(w in name.lower() for w in HELD_OUT_WORDS) or rel.replace(os.sep, "/") in HELD_OUT_FILES:
                    continue
                if not (name.endswith(".py") or is_doc_file(name)) or os.path.realpath(path) in seen:
                    continue
                if not name.endswith(".py") and name.split(".")[0] in man_pages:
                    continue
                seen.add(os.path.realpath(path))
                yield root, rel, path


def docstrings(source):
    """Module, class and function docstrings of Python source, parsed with ast: never imported, so
    nothing in the file runs. [] if it does not parse."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # invalid escape sequences in old code
            tree = ast.parse(source)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs, stack = [], [tree]
    while stack:   # statements only, in file order: expressions hold no docstrings and are most of the tree
        node = stack.pop()
        if isinstance(node, kinds) and (doc := ast.get_docstring(node, clean=True)):   # clean: inspect.cleandoc
            docs.append(doc)
        children = []
        for field in ("body", "orelse", "handlers", "finalbody", "cases"):
            value = getattr(node, field, None)
            children += value if isinstance(value, list) else []   # a lambda's body is one expression
        stack.extend(reversed(children))
    return docs


def prose(text):
    """The paragraphs of text that read as English: doctest blocks, code and tables dropped."""
    kept = []
    for para in re.split(r"\n[ \t\f]*\n", text.replace("\r\n", "\n").replace("\f", "")):
        lines = [l.rstrip() for l in para.split("\n") if not re.fullmatch(r"\s*[-=~*#^+_]{3,}\s*", l)]
        if not lines or any(l.lstrip().startswith(">>>") for l in lines):
            continue
        words = " ".join(lines).split()
        if len(words) >= 3 and sum(bool(WORD.fullmatch(w)) for w in words) >= 0.6 * len(words):
            kept.append("\n".join(lines).strip("\n"))
    return "\n\n".join(kept)


def reads_as_english(text):
    words = [w.strip("()\"'`.,;:!?").lower() for w in text.split()]
    alpha = [w for w in words if w.isalpha()]
    return len(alpha) >= REALTEXT_MIN_WORDS and sum(w in COMMON_WORDS for w in alpha) >= 0.1 * len(alpha)


def cut_documents(text):
    """Prose of one text as documents of at most about REALTEXT_DOC_CHARS, cut between paragraphs."""
    docs, current = [], ""
    for para in prose(text).split("\n\n"):
        if current and len(current) + len(para) > REALTEXT_DOC_CHARS:
            docs.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    docs.append(current)
    return [d for d in docs if reads_as_english(d)]


def read_file_text(path):
    """A file's text (gunzipped), or None when it is too big or not UTF-8."""
    try:
        if os.path.getsize(path) > REALTEXT_MAX_FILE_BYTES:
            return None
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read(REALTEXT_MAX_FILE_BYTES + 1)
        return None if len(data) > REALTEXT_MAX_FILE_BYTES else data.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None


def file_documents(item):
    """(source name, documents) of one file found by walk_files."""
    root, rel, path = item
    text = read_file_text(path)
    pieces = [] if text is None else docstrings(text) if path.endswith(".py") else [text]
    return os.path.join(os.path.basename(root.rstrip(os.sep)), rel), [d for piece in pieces for d in cut_documents(piece)]


def scan_realtext(roots, split, max_chars):
    """[(source, text)] of one split: docstrings of .py files and prose of doc files under roots, exact
    duplicates dropped, until max_chars. Only this split's files are read (val is a quick scan). Files
    are parsed by a pool of forked processes (ast.parse is most of the time), taken back in order."""
    files = (f for f in walk_files(roots) if is_val_file(f[1]) == (split == "val"))
    docs, seen, chars = [], set(), 0
    # fork, not spawn: a spawned worker would import the calling script (training code) again; a
    # daemonic process (a pool's own worker) may not start one, so it reads the files itself
    workers = min(os.cpu_count() or 1, 8)
    pool = None if workers < 2 or multiprocessing.current_process().daemon else multiprocessing.get_context("fork").Pool(workers)
    try:
        for source, file_docs in (pool.imap(file_documents, files, chunksize=8) if pool else map(file_documents, files)):
            for doc in file_docs:
                if doc in seen:
                    continue
                seen.add(doc)
                docs.append((source, doc))
                chars += len(doc)
                if chars >= max_chars:
                    return docs
        return docs
    finally:
        if pool is not None:
            pool.terminate()


class RealTextSource:
    """
    Real English text already on the machine: docstrings of the installed Python packages and the
    stdlib (parsed, never imported), and README/NEWS/.txt files of /usr/share/doc. Man pages,
    /usr/share/iso-codes, /etc/services and the http.HTTPStatus / errno tables are never read: they
    are the held-out sources for evaluating zero-shot reading of real documents.

    The document list is scanned once per split (~1-2 minutes on 2 cores) and cached in
    $NANOCHAT_REALTEXT_CACHE, else $NANOCHAT_BASE_DIR/realtext (keyed by the roots, their modification
    times and max_chars: runs on one machine can share it); document i is docs[i % len(docs)] (more epochs).
    """
    name = "realtext"

    def __init__(self, split="train", roots=None, max_chars=REALTEXT_MAX_CHARS):
        roots = [os.path.abspath(r) for r in (roots or default_roots())]
        if split == "val":
            max_chars = max(1, max_chars // REALTEXT_VAL_EVERY)
        # a root's mtime changes when a package is added to or removed from it: then scan again
        mtimes = [os.stat(r).st_mtime_ns if os.path.isdir(r) else 0 for r in roots]
        key = json.dumps([REALTEXT_FORMAT, split, max_chars, roots, mtimes])
        cache_dir = os.environ.get("NANOCHAT_REALTEXT_CACHE") or os.path.join(get_base_dir(), "realtext")
        cache = os.path.join(cache_dir, f"{split}_{hashlib.md5(key.encode()).hexdigest()[:12]}.json")
        if os.path.exists(cache):
            with open(cache, encoding="utf-8") as f:
                pairs = json.load(f)["docs"]
        else:
            t0 = time.time()
            pairs = scan_realtext(roots, split, max_chars)
            os.makedirs(cache_dir, exist_ok=True)
            atomic_write_text(cache, json.dumps({"roots": roots, "split": split, "docs": pairs}))
            print0(f"realtext {split}: {len(pairs):,} documents, {sum(len(t) for _, t in pairs):,} chars "
                   f"scanned in {time.time() - t0:.1f}s (cached in {cache})")
        if not pairs:
            raise ValueError(f"realtext: no {split} documents under {os.pathsep.join(roots)} "
                             f"(1 file in {REALTEXT_VAL_EVERY} is validation)")
        self.sources = [s for s, _ in pairs]
        self.docs = [t for _, t in pairs]

    def __len__(self):
        return len(self.docs)

    def get(self, i):
        return self.docs[i % len(self.docs)]


class MixedSource:
    """
    Several sources interleaved by fixed weights, document by document: 'embedded:3+realtext:1' gives,
    in every run of 4 documents, 3 embedded ones and 1 real one, spread evenly. Document i is a pure
    function of i, so resuming and splitting ranks work as for a single source.
    """
    name = "mix"

    def __init__(self, parts, split="train", generated=None):
        self.sources = [get_source(name, split, generated=generated) for name, _ in parts]
        self.weights = [w for _, w in parts]
        # one cycle of sum(weights) slots by smooth weighted round robin: (source, its n-th slot in the cycle)
        total = sum(self.weights)
        credit, used = [0] * len(parts), [0] * len(parts)
        self.cycle = []
        for _ in range(total):
            credit = [c + w for c, w in zip(credit, self.weights)]
            k = credit.index(max(credit))
            credit[k] -= total
            self.cycle.append((k, used[k]))
            used[k] += 1

    def __len__(self):
        # as many documents as there are before any source would repeat
        return min(len(s) // w for s, w in zip(self.sources, self.weights)) * len(self.cycle)

    def get(self, i):
        rounds, slot = divmod(i, len(self.cycle))
        k, n = self.cycle[slot]
        return self.sources[k].get(rounds * self.weights[k] + n)


def parse_mix(name):
    """'embedded:3+realtext:1' -> [('embedded', 3), ('realtext', 1)]; weights may be fractions
    ('embedded:0.75+realtext:0.25'), a missing weight is 1."""
    parts = []
    for part in name.split("+"):
        source, _, weight = part.rpartition(":") if ":" in part else (part, "", "1")
        try:
            w = Fraction(weight)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"--data {name!r}: weight {weight!r} of {source!r} is not a number") from None
        if w <= 0 or not source:
            raise ValueError(f"--data {name!r}: each part must be SOURCE or SOURCE:WEIGHT with WEIGHT > 0")
        parts.append((source, w))
    # smallest integer weights in the same proportions
    scale = math.lcm(*(w.denominator for _, w in parts))
    ints = [int(w * scale) for _, w in parts]
    g = math.gcd(*ints)
    ints = [w // g for w in ints]
    if sum(ints) > 1000:
        raise ValueError(f"--data {name!r}: the weights need a cycle of {sum(ints)} documents; use simpler proportions")
    return [(source, w) for (source, _), w in zip(parts, ints)]


def get_source(name, split="train", data_dir=None, generated=None):
    """A pretraining source by its --data name. generated: {name: document(i, split)} for text made on
    the fly (tasks.pretraining.GENERATED gives 'embedded', 'reading' and 'recall')."""
    generated = generated or {}
    if name in generated:
        return GeneratedSource(name, generated[name], split)
    if name == "realtext":
        return RealTextSource(split)
    if name == "fineweb":
        return ParquetSource(data_dir or os.path.join(get_base_dir(), "base_data"), split)
    if os.path.isdir(name):
        return ParquetSource(name, split)
    if "+" in name or ":" in name:
        return MixedSource(parse_mix(name), split, generated)
    known = ", ".join(f"'{n}'" for n in [*generated, "realtext", "fineweb"])
    raise ValueError(f"--data must be {known}, a directory of parquet files "
                     f"or a mix like 'embedded:3+realtext:1', got {name!r}")


def iter_texts(source, max_chars, start=0):
    """Documents from a source until max_chars characters have been yielded (tokenizer training)."""
    chars = 0
    for i in range(start, len(source)):
        if chars >= max_chars:
            return
        text = source.get(i)
        chars += len(text)
        yield text


def download_shard(index, data_dir, attempts=5):
    import requests
    path = os.path.join(data_dir, f"shard_{index:05d}.parquet")
    if os.path.exists(path):
        return path
    url = FINEWEB_URL.format(index)
    for attempt in range(1, attempts + 1):
        try:
            with requests.get(url, stream=True, timeout=30) as r:
                r.raise_for_status()
                tmp = path + ".tmp"
                with open(tmp, "wb") as f:
                    for chunk in r.iter_content(chunk_size=1 << 20):
                        f.write(chunk)
            os.replace(tmp, path)
            return path
        except Exception as e:
            if attempt == attempts:
                raise RuntimeError(f"could not download {url}: {e}") from None
            time.sleep(2 ** attempt)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Download FineWeb-Edu pretraining shards (~100 MB each) into $NANOCHAT_BASE_DIR/base_data")
    parser.add_argument("-n", "--num-shards", type=int, default=8, help="number of shards to download (the last one is used for validation)")
    parser.add_argument("--data-dir", default=None, help="target directory (default: $NANOCHAT_BASE_DIR/base_data)")
    args = parser.parse_args()
    if not 2 <= args.num_shards <= FINEWEB_MAX_SHARD + 1:
        parser.error(f"--num-shards must be between 2 and {FINEWEB_MAX_SHARD + 1}")
    data_dir = args.data_dir or os.path.join(get_base_dir(), "base_data")
    os.makedirs(data_dir, exist_ok=True)
    from tqdm import tqdm
    for i in tqdm(range(args.num_shards), desc="shards"):
        download_shard(i, data_dir)
    print(f"{args.num_shards} shards in {data_dir}")
