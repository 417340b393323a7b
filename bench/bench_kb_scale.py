"""
Knowledge bases at scale: build and serve KBs of 10k, 100k and 1M passages on this machine.

    python -m bench.bench_kb_scale                                        # everything below (1M: tens of minutes)
    python -m bench.bench_kb_scale --sizes 10000,100000 --faiss-vectors 100000   # quicker
    python -m bench.bench_kb_scale --compare-rev fcb4886                  # also the search RSS of that commit's code

Passages: documents of 300-700 words written here from text already on the machine (sentences of
the docstrings of bench/corpora.py, and knowledge-world articles from tasks/knowledge_world.py, each
retold about the document's own invented two-word name), then chunked by build_kb into 100-word
passages with 20 words of overlap (DPR's Wikipedia passages). Inputs are cached under --work-dir.

Per size, each in its own process (peak RSS from wait4, so one measurement never inherits another's):
  build        `kb_tools.build_kb --retrievers bm25`: seconds, peak RSS, bytes on disk per passage
  search       one `kb_tools.search_kb` query on the built KB: peak RSS, and the bytes of RSS per
               passage beyond the --small KB's (the issue's target: <= 300; 3.9 KB before, measured there)
  bm25 q/s     --queries queries through RetrievalManager, and through bm25s directly (same index)
Dense: MiniLM encoding docs/s in this process; a build of --dense-passages passages by 1 process
and by 2 torchrun processes (wall and CPU seconds: sharing the work should cost ~1x, not 2x).
FAISS: --faiss-vectors unit vectors (384-d, MiniLM's size; isotropic and clustered: --faiss-data) in
build_kb's flat / hnsw / ivf / ivfpq indexes: bytes per vector, build seconds, queries/s, recall@10
against flat.
"""
import os
# torch's OpenMP threads spin-wait between ops; on a CPU shared with other jobs that made a
# single-query encode 10x slower (292 ms vs 29 ms measured). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import argparse
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from nanochat.common import die, get_base_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated passage counts (default 10000,100000,1000000)")
parser.add_argument("--small", type=int, default=2000, help="passages of the small KB the search RSS is compared with")
parser.add_argument("--queries", type=int, default=1000, help="queries timed for BM25 q/s")
parser.add_argument("--dense-passages", type=int, default=2000, help="passages encoded for docs/s and the 1 vs 2 process build (0: skip)")
parser.add_argument("--faiss-vectors", type=int, default=1000000, help="unit vectors in the FAISS comparison, per --faiss-data (0: skip)")
parser.add_argument("--faiss-queries", type=int, default=200, help="queries timed per FAISS index")
parser.add_argument("--faiss-data", default="random,clustered",
                    help="vectors of the FAISS comparison: random (isotropic, the worst case) and/or clustered (one centre per 100)")
parser.add_argument("--compare-rev", default=None, help="git revision whose search_kb is also measured on each KB (e.g. the code before issue 31)")
parser.add_argument("--work-dir", default=None, help="inputs and KBs (default $NANOCHAT_BASE_DIR/bench_kb_scale)")
parser.add_argument("--keep", action="store_true", help="keep the built KBs (inputs are always kept)")
args = parser.parse_args()
try:
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
except ValueError:
    die(f"--sizes must be comma-separated integers, got {args.sizes!r}")
if not sizes or min(sizes) <= 0 or args.small <= 0 or args.queries <= 0:
    die("--sizes, --small and --queries must be positive")
if not set(args.faiss_data.split(",")) <= {"random", "clustered"}:
    die(f"--faiss-data must be random, clustered or both (comma-separated), got {args.faiss_data!r}")
work = args.work_dir or os.path.join(get_base_dir(), "bench_kb_scale")
os.makedirs(work, exist_ok=True)
rows = []   # (section, measure, value) for the final table


def report(section, measure, value):
    rows.append((section, measure, value))
    print(f"  {section:<22} {measure:<44} {value}", flush=True)


# -----------------------------------------------------------------------------
# passages

def sentence_pool():
    """Real sentences (docstrings of the installed stdlib/numpy/scipy/torch) and world articles."""
    from bench.corpora import docstring_corpus
    from tasks.knowledge_world import training_world, heldout_world
    real = []
    for doc in docstring_corpus(60000):
        for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.text.split())):
            if 6 <= len(s.split()) <= 60:
                real.append(s)
    world = [(d["id"], d["text"]) for w in (training_world(), heldout_world()) for d in w.documents()]
    return real, world


def passages_of(words, chunk_words=100, overlap=20):
    return 1 if words <= chunk_words else 1 + -(-(words - chunk_words) // (chunk_words - overlap))


def write_input(path, n_passages, seed=0):
    """Documents of 300-700 words until they make n_passages passages."""
    if os.path.exists(path):
        return
    from tasks.knowledge_world import ALL_NAMES
    real, world = POOL
    rng = random.Random(seed)
    made, i = 0, 0
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        while made < n_passages:
            name = f"{rng.choice(ALL_NAMES)} {rng.choice(ALL_NAMES)}"
            target, words, sentences = rng.randint(300, 700), 0, []
            while words < target:
                if rng.random() < 0.3:   # a world article, told about this document's name
                    old, text = rng.choice(world)
                    s = text.replace(old, name)
                else:
                    s = rng.choice(real)
                sentences.append(s)
                words += len(s.split())
            if made + passages_of(words) > n_passages:   # the last document: exactly the passages still missing
                keep = " ".join(" ".join(sentences).split()[:100 + 80 * (n_passages - made - 1)])
                sentences, words = [keep], len(keep.split())
            f.write(json.dumps({"id": f"d{i}", "title": name, "text": " ".join(sentences)}) + "\n")
            made += passages_of(words)
            i += 1
    os.replace(path + ".tmp", path)


# -----------------------------------------------------------------------------
# processes measured one by one

def run_measured(cmd, cwd=REPO, env=None):
    """(seconds, peak RSS in MB, CPU seconds, stdout) of one command, measured by GNU time: its child
    is forked from a small process (a child forked from this one would inherit this process's peak
    RSS, which Linux keeps across exec), and its CPU time includes waited-for children (torchrun's workers)."""
    t0 = time.time()
    with tempfile.NamedTemporaryFile("w+") as usage:
        proc = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", "-o", usage.name, *cmd], cwd=cwd,
                              env=env or dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True)
        if proc.returncode != 0:
            stderr = proc.stderr.strip()
            die(f"{' '.join(cmd)} failed: {stderr.splitlines()[-1] if stderr else proc.returncode}")
        kb, user, system = usage.read().split()[-3:]
    return time.time() - t0, int(kb) / 1024, float(user) + float(system), proc.stdout


def build(input_path, kb, *extra, launcher=()):
    shutil.rmtree(kb, ignore_errors=True)
    return run_measured([sys.executable, *launcher, "-m", "kb_tools.build_kb", "--input", input_path, "--out", kb,
                         "--no-progress", "--json", *extra])


def search_rss(kb, query, code_dir=REPO):
    env = dict(os.environ, PYTHONPATH=code_dir)
    return run_measured([sys.executable, "-m", "kb_tools.search_kb", "--kb", kb, "--query", query, "--top-k", "10",
                         "--json"], cwd=code_dir, env=env)[1]


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def queries_of(kb, n, seed=1):
    from nanochat.retrieval import load_kb
    chunks = load_kb(kb, verify=False).chunks
    rng = random.Random(seed)
    return [" ".join(chunks[rng.randrange(len(chunks))].text.split()[:12]) for _ in range(n)]


def bm25_speed(kb, queries):
    """Queries/s through RetrievalManager (top 10), and through bm25s directly on the same arrays."""
    import bm25s
    from nanochat.retrieval import RetrievalManager
    from nanochat.retrieval.documents import tokenize
    manager = RetrievalManager(kb, "bm25")
    t0 = time.time()
    for q in queries:
        manager.search(q, 10)
    ours = len(queries) / (time.time() - t0)
    raw = bm25s.BM25.load(os.path.join(kb, "bm25"), mmap=True, show_progress=False)
    tokens = [[t for t in tokenize(q) if t in raw.vocab_dict] for q in queries]
    t0 = time.time()
    for toks in tokens:
        if toks:
            raw.retrieve([toks], k=10, show_progress=False, n_threads=1)
    return ours, len(queries) / (time.time() - t0)


# -----------------------------------------------------------------------------

print(f"work dir {work}; every process niced as this one is; {os.cpu_count()} CPUs")
POOL = sentence_pool()
print(f"sentence pool: {len(POOL[0]):,} docstring sentences, {len(POOL[1]):,} world articles")
old_code = None
if args.compare_rev:
    old_code = tempfile.mkdtemp(prefix="kb_scale_old_")
    archive = subprocess.run(["git", "archive", args.compare_rev, "nanochat", "kb_tools"], cwd=REPO, capture_output=True)
    if archive.returncode != 0:
        die(f"--compare-rev {args.compare_rev}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", old_code], input=archive.stdout, check=True)

search_mb = {}
for n in [args.small] + sizes:
    section = f"{n:,} passages"
    path = os.path.join(work, f"passages_{n}.jsonl")
    t0 = time.time()
    write_input(path, n)
    kb = os.path.join(work, f"kb_{n}")
    seconds, rss, cpu, out = build(path, kb, "--retrievers", "simple")   # simple has no index: the streaming alone
    report(section, "build, no index (read, chunk, write): s / peak RSS MB", f"{seconds:.1f} / {rss:.0f}")
    seconds, rss, cpu, out = build(path, kb, "--retrievers", "bm25")
    summary = json.loads(out.strip().splitlines()[-1])
    report(section, "build with bm25: seconds / peak RSS MB", f"{seconds:.1f} / {rss:.0f}")
    report(section, "KB on disk, bytes per passage", f"{dir_bytes(kb) / summary['chunks']:.0f} ({summary['chunks']:,} passages)")
    queries = queries_of(kb, args.queries)
    search_mb[n] = search_rss(kb, queries[0])
    report(section, "search_kb: peak RSS MB", f"{search_mb[n]:.0f}")
    if n != args.small:
        per = (search_mb[n] - search_mb[args.small]) * 2**20 / (summary["chunks"] - args.small)
        report(section, f"search RSS per passage beyond the {args.small:,} KB", f"{per:.0f} bytes")
    if old_code:
        before = search_rss(kb, queries[0], old_code)
        report(section, f"search_kb peak RSS MB, code of {args.compare_rev}", f"{before:.0f}")
    ours, raw = bm25_speed(kb, queries)
    report(section, "bm25 queries/s: ours / bm25s directly", f"{ours:.0f} / {raw:.0f}")
    if not args.keep and n != args.small:
        shutil.rmtree(kb)

if args.dense_passages:
    from nanochat.retrieval import dense, load_kb
    from nanochat.retrieval.documents import index_text
    section = f"dense, {args.dense_passages:,} passages"
    path = os.path.join(work, f"passages_{args.dense_passages}.jsonl")
    write_input(path, args.dense_passages)
    kb = os.path.join(work, f"kb_{args.small}")
    if not os.path.exists(kb):
        build(os.path.join(work, f"passages_{args.small}.jsonl"), kb, "--retrievers", "bm25")
    texts = [index_text(c) for c in load_kb(kb).chunks[:min(500, args.dense_passages)]]
    model = dense.load_model()
    dense.encode(model, texts[:32])   # warm-up
    t0 = time.time()
    dense.encode(model, texts)
    report(section, f"MiniLM encoding docs/s ({len(texts)} passages, 1 process)", f"{len(texts) / (time.time() - t0):.1f}")
    runs = {}
    for procs in (1, 2):
        launcher = () if procs == 1 else ("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}")
        # batch 16: blocks of 64 x 16 = 1024 chunks, so 2 processes have at least one block each
        runs[procs] = build(path, os.path.join(work, f"kb_dense_{procs}"), "--retrievers", "dense", "--batch-size", "16",
                            launcher=launcher)
        report(section, f"build, {procs} process{'es' if procs > 1 else ''}: wall s / CPU s",
               f"{runs[procs][0]:.0f} / {runs[procs][2]:.0f}")
    e1, e2 = (np.load(os.path.join(work, f"kb_dense_{p}", "dense", "embeddings.npy")) for p in (1, 2))
    report(section, "max |embedding difference|, 1 vs 2 processes", f"{np.abs(e1 - e2).max():.1e}")
    if not args.keep:
        for p in (1, 2):
            shutil.rmtree(os.path.join(work, f"kb_dense_{p}"))

def unit_vectors(rng, n, d, data, centers):
    """n unit vectors. random: isotropic, the worst case for approximate search (every neighbour is
    nearly as far as any other). clustered: around `centers` (unit vectors, one per 100 points), like
    the topical clumps of text embeddings, which approximate indexes are built for."""
    if data == "random":
        x = rng.standard_normal((n, d), dtype=np.float32)
    else:
        x = np.empty((n, d), dtype=np.float32)
        for start in range(0, n, 100_000):   # in blocks: the noise of 1M vectors at once is another 1.5 GB
            m = min(100_000, n - start)
            noise = rng.standard_normal((m, d), dtype=np.float32)
            noise *= 0.6 / np.linalg.norm(noise, axis=1, keepdims=True)   # cosine ~0.86 to the point's centre
            x[start:start + m] = centers[rng.integers(0, len(centers), m)] + noise
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


if args.faiss_vectors:
    import faiss
    from nanochat.retrieval.dense import build_faiss_index
    n, d = args.faiss_vectors, 384
    for data in args.faiss_data.split(","):
        section = f"faiss, {n:,} {data} vectors"
        rng = np.random.default_rng(0)
        centers = unit_vectors(rng, max(1, n // 100), d, "random", None)
        x = unit_vectors(rng, n, d, data, centers)
        q = unit_vectors(rng, args.faiss_queries, d, data, centers)
        truth, current = None, None
        for kind, knob, value in (("flat", None, None), ("hnsw", "efSearch", 64), ("ivf", "nprobe", 8), ("ivf", "nprobe", 64),
                                  ("ivfpq", "nprobe", 8), ("ivfpq", "nprobe", 64)):
            if current is None or current[0] != kind:   # each index built once, then searched with each setting
                current = None   # free the previous index first
                t0 = time.time()
                index = build_faiss_index(x, kind)
                built = time.time() - t0
                with tempfile.NamedTemporaryFile() as f:
                    faiss.write_index(index, f.name)
                    per_vector = os.path.getsize(f.name) / n
                current = (kind, index, built, per_vector)
            _, index, built, per_vector = current
            if knob:
                setattr(index.hnsw if kind == "hnsw" else index, knob, value)
            t0 = time.time()
            _, found = index.search(q, 10)
            qps = len(q) / (time.time() - t0)
            if truth is None:
                truth = found
            recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])
            report(section, f"{kind}{f' {knob} {value}' if knob else ''}: bytes/vector, build s, q/s, recall@10",
                   f"{per_vector:.0f}, {built:.0f}, {qps:.0f}, {recall:.3f}")
        del x, index, current

if old_code:
    shutil.rmtree(old_code, ignore_errors=True)
print("\n| section | measure | value |\n|---|---|---|")
for section, measure, value in rows:
    print(f"| {section} | {measure} | {value} |")
