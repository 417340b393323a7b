"""Real English text from the machine (RealTextSource) and mixed sources: text is read only under the
roots given, docstrings come from parsing (never importing), doctest code is dropped, held-out
evaluation sources are never read, the split is by file, and everything is deterministic."""
import os
import gzip

import pytest

from tasks.pretraining import GENERATED
from nanochat.dataset import (RealTextSource, get_source, iter_texts, is_val_file, parse_mix, prose, docstrings,
                              scan_realtext)
from nanochat.tokenizer import Tokenizer

SENTENCE = ("This helper reads the input file and returns the number of lines that were found in it, "
            "which is what the report at the end of the run needs to show.")


def module(path, doc, body=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'"""{doc}"""\n{body}', encoding="utf-8")


def train_file(name):
    # the precondition of tests that need a file in the train split (the split is a hash of the path)
    assert not is_val_file(name), name
    return name


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """A corpus directory and, next to it, one that must never be read."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.delenv("NANOCHAT_REALTEXT_ROOTS", raising=False)
    monkeypatch.delenv("NANOCHAT_REALTEXT_CACHE", raising=False)   # the cache these tests check is the base dir's
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    marker = tmp_path / "imported"
    module(inside / train_file("pkg/zorb.py"),
           "The zorblaxquint module. " + "A zorblaxquint is read by the zorblaxquint reader of the city. " * 100,
           'def f():\n    """' + SENTENCE + '\n\n    >>> f()\n    secretdoctestoutput\n    """\n')
    # a module that raises on import (and would leave a marker): its docstring still counts
    module(inside / train_file("pkg/boom.py"), "Boom module. " + SENTENCE,
           f"open({str(marker)!r}, 'w').write('ran')\nraise RuntimeError('imported')\n")
    module(inside / "pkg/codey.py", "x = compute(1, 2)\ny = x + 3\nfor i in range(10):\n    print(i, x, y)\n" * 4)
    (inside / "pkg/broken.py").write_text('"""' + SENTENCE + '"""\ndef (:\n', encoding="utf-8")
    (inside / "pkg/latin1.py").write_bytes(b'"""caf\xe9 ' + SENTENCE.encode() + b'"""\n')
    for k in range(150):   # enough files for both splits (1 in 50 is validation)
        module(inside / f"many/mod_{k}.py", f"Module number {k}. {SENTENCE}")
    (inside / "README.txt").write_text(SENTENCE + " The readme is real prose from a documentation file.\n")
    (inside / "docpkg").mkdir()
    with gzip.open(inside / "docpkg/NEWS.gz", "wt") as f:
        f.write(SENTENCE + " The gzipped news file is read after it is decompressed.\n")
    (inside / "docpkg/copyright").write_text("licenceword " * 30 + SENTENCE)   # licences: repetitive, skipped
    # held-out evaluation sources: never read even when under a root
    (inside / "man").mkdir()
    (inside / "man/README").write_text("manpageword " * 30 + SENTENCE)
    module(inside / "pkg/status_codes.py", "statusword " * 30 + SENTENCE)
    module(inside / "http/__init__.py", "httpstatusword " * 30 + SENTENCE)
    module(outside / "evil.py", "The quexmorvantil module. " + "A quexmorvantil is read by the quexmorvantil reader. " * 100)
    return inside, outside, marker


def all_texts(roots):
    return [t for split in ("train", "val") for t in RealTextSource(split, roots=roots).docs]


def test_reads_only_inside_the_roots_and_never_imports(dirs):
    inside, outside, marker = dirs
    text = "\n".join(all_texts([str(inside)]))
    assert "zorblaxquint" in text and "quexmorvantil" not in text
    assert "Boom module." in text and not marker.exists()   # parsed, never run
    assert "readme is real prose" in text and "gzipped news file" in text and "licenceword" not in text
    for held_out in ("manpageword", "statusword", "httpstatusword"):
        assert held_out not in text
    with pytest.raises(ValueError, match="held-out"):
        RealTextSource(roots=[str(inside / "man")])


def test_doctests_code_and_unparsable_files_are_dropped(dirs):
    inside, _, _ = dirs
    text = "\n".join(all_texts([str(inside)]))
    assert SENTENCE in text   # the prose part of f's docstring
    assert "secretdoctestoutput" not in text and ">>>" not in text
    assert "compute(1, 2)" not in text
    assert "café" not in text   # not UTF-8: skipped, no crash
    assert docstrings("def (:\n") == []
    assert prose("Some words here that read fine.\n\n>>> x = 1\n1\n\n-----\na = b(c) + d[e]") == "Some words here that read fine."


def test_split_is_by_file_and_deterministic(dirs, tmp_path, monkeypatch):
    inside, _, _ = dirs
    train, val = RealTextSource("train", roots=[str(inside)]), RealTextSource("val", roots=[str(inside)])
    assert len(val) > 0 and len(train) > len(val)
    assert not set(train.sources) & set(val.sources)
    assert all(is_val_file(os.path.relpath(s, "inside")) for s in val.sources)
    assert len(set(train.docs)) == len(train.docs)   # exact duplicates dropped
    # the second source comes from the cache; a fresh scan gives the very same list
    cached = RealTextSource("train", roots=[str(inside)])
    assert os.listdir(tmp_path / "base" / "realtext")
    assert cached.docs == train.docs
    assert [t for _, t in scan_realtext([str(inside)], "train", 10 ** 9)] == train.docs
    # files are parsed by a pool of forked workers (on a machine with 2+ cores), read back in order: the
    # same list as one process reading them itself
    import multiprocessing
    from nanochat import dataset
    pools, get_context = [], multiprocessing.get_context
    monkeypatch.setattr(dataset.multiprocessing, "get_context", lambda kind: pools.append(kind) or get_context(kind))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    pooled = scan_realtext([str(inside)], "train", 10 ** 9)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert pools == ["fork"] and scan_realtext([str(inside)], "train", 10 ** 9) == pooled and pools == ["fork"]
    assert train.get(len(train) + 3) == train.get(3)   # more epochs wrap around
    # the character cap stops the scan at the document that reaches it
    capped = RealTextSource("train", roots=[str(inside)], max_chars=500).docs
    assert capped == train.docs[:len(capped)] and sum(map(len, capped[:-1])) < 500 <= sum(map(len, capped))


def test_tokenizer_training_never_reads_outside_its_corpus(dirs):
    inside, outside, _ = dirs

    def vocab(roots):
        source = RealTextSource("train", roots=roots)
        tok = Tokenizer.train_from_iterator(iter_texts(source, 10 ** 7), 350)
        return [tok.id_to_token(i) for i in range(tok.get_vocab_size())]

    inside_vocab = vocab([str(inside)])
    assert any("zorblax" in t for t in inside_vocab)
    assert not any("quexmor" in t or "vantil" in t for t in inside_vocab)
    # the control: the same training given the other directory too does learn its word
    assert any("quexmor" in t for t in vocab([str(inside), str(outside)]))


def test_mix_interleaves_by_weight(dirs, monkeypatch):
    inside, _, _ = dirs
    assert parse_mix("embedded+realtext") == [("embedded", 1), ("realtext", 1)]
    assert parse_mix("embedded:0.75+realtext:0.25") == [("embedded", 3), ("realtext", 1)]
    assert parse_mix("embedded:6+realtext:2") == [("embedded", 3), ("realtext", 1)]
    for bad in ("embedded:0+realtext", "embedded:x+realtext", ":2"):
        with pytest.raises(ValueError):
            parse_mix(bad)
    with pytest.raises(ValueError, match="--data"):
        get_source("nonsense")
    monkeypatch.setenv("NANOCHAT_REALTEXT_ROOTS", str(inside))
    mix = get_source("embedded:3+realtext:1", "train", generated=GENERATED)
    embedded, real = get_source("embedded", "train", generated=GENERATED), get_source("realtext", "train")
    docs = [mix.get(i) for i in range(8)]
    assert [d in real.docs for d in docs] == [False, False, True, False] * 2   # spread evenly, not in bursts
    assert [d for d in docs if d in real.docs] == [real.get(0), real.get(1)]
    assert [d for d in docs if d not in real.docs] == [embedded.get(k) for k in range(6)]
    assert docs == [get_source("embedded:3+realtext:1", "train", generated=GENERATED).get(i) for i in range(8)]   # deterministic
    assert len(get_source("realtext:1+realtext:1", "train")) == 2 * len(real)
