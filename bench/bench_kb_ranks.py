"""
Memory of each torchrun rank of an SFT run that retrieves from a large KB: is the KB mapped
(shared by the ranks through the page cache) or copied into every rank?

    python -m bench.bench_kb_scale --sizes 1000000 --dense-passages 0 --faiss-vectors 0 --keep
    python -m bench.bench_kb_ranks --kb $NANOCHAT_BASE_DIR/bench_kb_scale/kb_1000000 \\
        --small-kb $NANOCHAT_BASE_DIR/bench_kb_scale/kb_2000 --base-dir runs/cpu_d4

For each KB: a QA file of --questions questions about random passages of it (the answer: words that
follow a passage's opening), then `torchrun --nproc_per_node N -m scripts.chat_sft --kb KB --qa QA
--curriculum qa` for --steps steps from --base-dir's base checkpoint, BM25 retrieval. While it runs,
every rank's /proc status is sampled: peak RSS (VmHWM), and the largest private (RssAnon) and
file-backed (RssFile: mapped KB arrays and libraries, shared) parts seen.
"""
import os
import sys
import json
import time
import random
import shutil
import argparse
import tempfile
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

parser = argparse.ArgumentParser(description="peak memory per torchrun rank of an SFT run over a large KB")
parser.add_argument("--kb", required=True, help="the large KB (e.g. bench_kb_scale's kb_1000000, kept with --keep)")
parser.add_argument("--small-kb", default=None, help="a small KB measured the same way, for comparison")
parser.add_argument("--base-dir", required=True, help="a run directory with tokenizer/ and base_checkpoints/ (e.g. runs/cpu_d4)")
parser.add_argument("--model-tag", default=None, help="base checkpoint tag (default: the only one)")
parser.add_argument("--nproc", type=int, default=2, help="torchrun processes")
parser.add_argument("--steps", type=int, default=3, help="SFT steps")
parser.add_argument("--questions", type=int, default=64, help="questions written per KB")
args = parser.parse_args()


def die(msg):
    print(f"bench_kb_ranks: {msg}", file=sys.stderr)
    sys.exit(1)


for path, flag in ((args.kb, "--kb"), (args.small_kb, "--small-kb")):
    if path and not os.path.exists(os.path.join(path, "manifest.json")):
        die(f"{flag} {path}: not a KB directory (no manifest.json)")
for sub in ("tokenizer", "base_checkpoints"):
    if not os.path.isdir(os.path.join(args.base_dir, sub)):
        die(f"--base-dir {args.base_dir}: no {sub}/ (a run directory of speedrun_rag.sh has both)")


def write_questions(kb, path, n, seed=0):
    """Questions whose answers are in one passage: 'What comes after "<its first 8 words>"?' -> the next 3 words."""
    from nanochat.retrieval import load_kb
    chunks = load_kb(kb, verify=False).chunks
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < n:
            c = chunks[rng.randrange(len(chunks))]
            words = c.text.split()
            if len(words) < 12:
                continue
            row = {"question": f"What comes after \"{' '.join(words[:8])}\"?", "answers": [" ".join(words[8:11])],
                   "supporting_ids": [c.doc_id]}
            f.write(json.dumps(row) + "\n")
            written += 1
    return len(chunks)


def status(pid):
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "RssAnon", "RssFile"):
                    fields[key] = int(value.split()[0]) / 1024
    except OSError:
        return None
    return fields


def workers(root):
    """pids of the chat_sft processes under root (torchrun's workers, or root itself)."""
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ")
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except OSError:
            continue
        if b"scripts.chat_sft" in cmd and b"torchrun" not in cmd and b"torch.distributed.run" not in cmd:
            found.append(pid)
    return found


def measure(kb, work):
    qa = os.path.join(work, "qa.jsonl")
    passages = write_questions(kb, qa, args.questions)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc)]
                if args.nproc > 1 else [sys.executable])
    cmd = launcher + ["-m", "scripts.chat_sft", "--source", "base", "--kb", kb, "--qa", qa, "--curriculum", "qa",
                      "--num-iterations", str(args.steps), "--device-batch-size", "2", "--eval-every", "0",
                      "--qa-heldout-frac", "0", "--out-tag", "bench_kb_ranks", "--no-compile"]
    if args.model_tag:
        cmd += ["--model-tag", args.model_tag]
    env = dict(os.environ, NANOCHAT_BASE_DIR=work, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = {}
    while proc.poll() is None:
        for pid in workers(proc.pid):
            s = status(pid)
            if s:
                p = peaks.setdefault(pid, {"VmHWM": 0, "RssAnon": 0, "RssFile": 0})
                for k, v in s.items():
                    p[k] = max(p[k], v)
        time.sleep(0.2)
    out = proc.stdout.read()
    if proc.returncode != 0:
        die(f"chat_sft over {kb} failed:\n{out[-2000:]}")
    return passages, time.time() - t0, [peaks[pid] for pid in sorted(peaks)]


rows = []
for kb in [k for k in (args.small_kb, args.kb) if k]:
    work = tempfile.mkdtemp(prefix="kb_ranks_")
    try:
        for sub in ("tokenizer", "base_checkpoints"):
            os.symlink(os.path.abspath(os.path.join(args.base_dir, sub)), os.path.join(work, sub))
        passages, seconds, ranks = measure(os.path.abspath(kb), work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if len(ranks) != args.nproc:
        die(f"saw {len(ranks)} chat_sft processes over {kb}, expected {args.nproc}")
    for r, p in enumerate(ranks):
        rows.append((f"{passages:,}", r, p["VmHWM"], p["RssAnon"], p["RssFile"], seconds))
        print(f"{passages:>11,} passages | rank {r} | peak RSS {p['VmHWM']:7.0f} MB | private (anon) {p['RssAnon']:6.0f} MB "
              f"| file-backed {p['RssFile']:6.0f} MB | {seconds:.0f} s", flush=True)

print()
print("| KB passages | rank | peak RSS MB | largest private (anon) MB | largest file-backed MB |")
print("|---|---|---|---|---|")
for passages, r, hwm, anon, file_, _ in rows:
    print(f"| {passages} | {r} | {hwm:.0f} | {anon:.0f} | {file_:.0f} |")
