"""speedrun_rag.sh --smoke end to end (~2-3 minutes on 2 busy cores): a run killed during SFT fails
naming the stage and its log; rerunning skips the finished stages and completes; the report has
non-empty plots, the EM table and sample conversations; the printed chat command answers."""
import os
import re
import shlex
import signal
import subprocess
import time

import pytest

from tests.conftest import REPO


def descendants(pid):
    """Process ids below pid (children, grandchildren, ...), from /proc."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    # the command name is in parentheses and may hold spaces: the ppid follows the last ')'
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found += kids
        frontier += kids
    return found


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the SFT process through /proc")
def test_speedrun_smoke_kill_resume_and_report(tmp_path):
    run_dir = tmp_path / "run"
    logs = run_dir / "logs"
    # the hybrid pattern checks that BLOCK_PATTERN reaches every stage (model tag d2_TM)
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1", BLOCK_PATTERN="TM",
               PYTHONUNBUFFERED="1")
    for name in ("NPROC", "RUN_DIR"):   # the script reads these too; the test sets its own
        env.pop(name, None)
    cmd = ["bash", "speedrun_rag.sh", "--smoke", "--run-dir", str(run_dir)]

    # 1) first run: kill the SFT process once it is training, as a user's kill would
    out1 = tmp_path / "first.out"
    with open(out1, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        sft_pid = None
        while time.time() < deadline and proc.poll() is None:
            if sft_pid is None:
                sft_pid = next((p for p in descendants(proc.pid) if "scripts.chat_sft" in cmdline(p)), None)
            elif "SFT of" in (logs / "sft.log").read_text(errors="replace"):
                os.kill(sft_pid, signal.SIGTERM)
                break
            time.sleep(0.2)
        assert sft_pid is not None, "SFT never started:\n" + out1.read_text()[-3000:]
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)   # our own process group (start_new_session)
            proc.wait()
    first = out1.read_text()
    assert rc != 0, first[-3000:]
    assert "stage 'sft' FAILED" in first and f"{logs}/sft.log" in first, first[-3000:]
    assert (logs / "tokenizer.done").exists() and (logs / "base.done").exists()
    assert not (logs / "sft.done").exists()

    # 2) rerun: finished stages are skipped, the rest runs to the report
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    second = proc.stdout + proc.stderr
    assert proc.returncode == 0, second[-4000:]
    assert "== tokenizer: done before" in second and "== base: done before" in second, second[:3000]
    assert "== sft: launch -m scripts.chat_sft --model-tag d2_TM --block-pattern TM" in second
    for stage in ("tokenizer", "base", "sft", "rl", "kb", "eval", "transfer", "retriever", "report"):
        assert (logs / f"{stage}.done").exists(), stage
    assert (run_dir / "chatrl_checkpoints" / "d2_TM").is_dir()

    # the report: plots, the EM table, retrieval metrics, three sample conversations
    report = (run_dir / "report.md").read_text()
    for png in ("pretrain.png", "sft_loss.png", "sft_heldout.png", "rl.png"):
        data = (run_dir / "report" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
        assert f"(report/{png})" in report
    assert "## Held-out exact match" in report
    table = report.split("## Held-out exact match")[1]
    for row in ("(`world2`)", "(`world3`)"):
        line = next(l for l in table.splitlines() if row in l)
        assert len(re.findall(r"\d+\.\d%", line)) == 4, line   # SFT/RL x with/without retrieval
    assert re.search(r"\| single-hop questions \| \d+ \| 1\.000 \|", report), "BM25 should find every single-hop article"
    assert report.count("```text") == 3 and report.count("\nanswer: ") == 3
    assert "| base |" in report and "| **total** |" in report
    retriever = report.split("## The retriever learns from the model")[1].split("##")[0]
    assert "| MiniLM, base query encoder |" in retriever or "kept the base encoder" in retriever, retriever

    # the printed one-shot chat command works as printed
    chat = next(l.strip() for l in second.splitlines() if "scripts.chat_cli" in l and " -p " in l)
    assert f"--kb {run_dir}/kb/heldout" in chat and "--model-tag d2_TM" in chat
    argv = shlex.split(chat)
    chat_env = dict(env, **dict(a.split("=", 1) for a in argv if re.fullmatch(r"[A-Z_]+=.*", a)))
    argv = [a for a in argv if not re.fullmatch(r"[A-Z_]+=.*", a)] + ["--max-tokens", "16"]
    proc = subprocess.run(argv, cwd=REPO, env=chat_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "error" not in proc.stderr, proc.stderr[-2000:]   # a smoke model may say nothing
