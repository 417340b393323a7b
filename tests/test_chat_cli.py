"""chat_cli on the tiny model + KB of test_chat_web: one-shot -p with sources, --retrieval off,
interactive through stdin and through a pseudo-terminal (with Ctrl-C stopping an answer), errors."""
import os
import pty
import sys
import time
import select
import signal
import subprocess

import pytest

from tests.conftest import REPO, run_module
from tests.test_chat_web import make_tiny_chat


@pytest.fixture(scope="module")
def chat_dirs(tmp_path_factory, tokenizer):
    return make_tiny_chat(str(tmp_path_factory.mktemp("chat_cli")), tokenizer)


def cli(chat_dirs, *args, stdin=None):
    base, kb = chat_dirs
    env = dict(os.environ, NANOCHAT_BASE_DIR=base, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "scripts.chat_cli", "--kb", kb, "--device-type", "cpu", *args],
                          cwd=REPO, env=env, input=stdin, capture_output=True, text=True, timeout=120)


def test_one_shot_prints_answer_and_sources(chat_dirs):
    p = cli(chat_dirs, "--retrieval", "always", "--top-k", "2", "--max-tokens", "12", "-p", "Where was Kela Varo born?")
    assert p.returncode == 0, p.stderr
    answer, sources, *docs = p.stdout.rstrip("\n").split("\n")
    assert answer.strip() and sources == "Sources:"
    assert docs == ["  [1] Kela Varo (kela#0): Kela Varo was born in Osk, the old river city. "
                    "She wrote three books about the blue king."]


def test_ensemble_mode_reads_each_document_and_lists_them(chat_dirs, tokenizer):
    """--retrieval ensemble: the same sources as always; its answer is the greedy mixture decoding
    of one prompt per document (computed here in-process with Engine.generate_ensemble)."""
    import torch
    from nanochat.checkpoint_manager import load_model
    from nanochat.chat import build_conversation
    from nanochat.engine import Engine
    from nanochat.retrieval import RetrievalManager
    from nanochat.rollout import ensemble_prompts, ensemble_weights
    q = "Was the blue king born in Osk?"   # two documents match
    ens = cli(chat_dirs, "--retrieval", "ensemble", "--top-k", "2", "--max-tokens", "12", "-p", q)
    always = cli(chat_dirs, "--retrieval", "always", "--top-k", "2", "--max-tokens", "12", "-p", q)
    assert ens.returncode == 0, ens.stderr
    assert ens.stdout.split("Sources:")[1] == always.stdout.split("Sources:")[1]
    base, kb = chat_dirs
    os.environ["NANOCHAT_BASE_DIR"] = base
    try:
        model, tok, _ = load_model("sft", torch.device("cpu"))
    finally:
        del os.environ["NANOCHAT_BASE_DIR"]
    conversation, docs = build_conversation([{"role": "user", "content": q}], "ensemble", RetrievalManager(kb), 2)
    prompts, docs = ensemble_prompts(tok, conversation, model.config.sequence_len - 12)
    assert len(prompts) == 2
    tokens = []
    for step in Engine(model, tok).generate_ensemble([prompts], [ensemble_weights(docs)], max_tokens=12):
        tokens += step[0]
    assert ens.stdout.split("\nSources:")[0].strip() == tok.decode_text(tokens).strip()


def test_retrieval_off_shows_no_sources(chat_dirs):
    p = cli(chat_dirs, "--retrieval", "off", "--max-tokens", "12", "-p", "Where was Kela Varo born?")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() and "Sources" not in p.stdout and "Kela Varo" not in p.stdout


def test_interactive_through_stdin(chat_dirs):
    # the escape-sequence document: its text reaches the terminal without control characters
    p = cli(chat_dirs, "--retrieval", "always", "--max-tokens", "8",
            stdin="Where was Kela Varo born?\nterminal escape test\n\nclear\nOsk\nquit\n")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert out.startswith("nanochat-rag | sft model TT step 0 | retrieval always over ")
    assert out.count("Assistant: ") == 3 and out.count("Sources:") == 3 and "(new conversation)" in out
    assert "[1] Kela Varo (kela#0)" in out and "[1] Osk (osk#0)" in out
    assert "[1] Terminal escape test (ansi#0): Red [31mALERT[0m text, a bell and a title ]0;pwned grab." in out
    assert "\x1b" not in out and "\x07" not in out


def read_until(fd, needle, timeout=60):
    """Read a pty until `needle` shows up; returns everything read."""
    out, deadline = b"", time.time() + timeout
    while needle.encode() not in out:
        assert time.time() < deadline, f"never saw {needle!r} in {out.decode(errors='replace')[-2000:]!r}"
        if select.select([fd], [], [], 0.2)[0]:
            try:
                out += os.read(fd, 4096)
            except OSError:   # the child closed the terminal
                break
    return out.decode(errors="replace")


def test_interactive_in_a_terminal_with_ctrl_c(tmp_path, tokenizer):
    # a long context and a long answer: the tiny model streams for seconds, so Ctrl-C lands mid-answer
    base, kb = make_tiny_chat(str(tmp_path), tokenizer, sequence_len=4096)
    env = dict(os.environ, NANOCHAT_BASE_DIR=base, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TERM="dumb")
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_cli", "--kb", kb, "--device-type", "cpu",
                             "--max-tokens", "4000"],
                            cwd=REPO, env=env, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                            # as a terminal's foreground job: when pytest itself runs as a background job
                            # (`cmd &` in a script), SIGINT is ignored and children would inherit that
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    os.close(slave)
    try:
        read_until(master, "User: ")
        os.write(master, b"Tell me about the blue king\n")
        read_until(master, "Assistant: ")
        assert select.select([master], [], [], 60)[0] and os.read(master, 4096)   # the first streamed word
        # Ctrl-C as the terminal sends it: SIGINT to the foreground process group
        os.killpg(proc.pid, signal.SIGINT)
        out = read_until(master, "User: ")
        assert "[stopped]" in out
        os.write(master, b"quit\n")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def test_errors_are_one_line(chat_dirs, tmp_path):
    base, _ = chat_dirs
    p = run_module("scripts.chat_cli", "--retrieval", "always", "-p", "hi", base_dir=base)
    assert p.returncode == 2 and p.stderr.strip() == "error: --retrieval always needs --kb"
    p = run_module("scripts.chat_cli", "--kb", str(tmp_path / "nope"), "-p", "hi", base_dir=base)
    assert p.returncode == 2 and p.stderr.startswith("error:") and "knowledge base directory not found" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
