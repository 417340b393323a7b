"""
Pretraining tokens/s of this project's base_train next to nanochat's, side by side on this machine:
same text (the embedded knowledge world written as parquet shards), same dimensions (depth 4,
width 128, head dim 32, context 512, batch 8 x 512, vocab 2048), one run after the other.

    python -m bench.bench_vs_nanochat --nanochat ~/src/nanochat --nanochat-python ~/src/nanochat/.venv/bin/python

--nanochat is a checkout of https://github.com/karpathy/nanochat (nothing of it is copied here);
--nanochat-python a Python with its dependencies (its `uv sync --extra cpu`, or torch + kernels,
wandb, psutil, filelock, pyarrow, rustbpe, tiktoken). Each trainer trains its own tokenizer on the
same shards and runs --steps steps with torch.compile (nanochat always compiles; this project's
base_train by default, with no extra flag; eager with --no-compile, or both with --also-no-compile);
the number is the median tokens/s of the second half of the steps, read from each trainer's own
step lines. --rounds N alternates the trainers N times (the machine's load drifts; ratios per round
are printed). --patterns adds this project's Mamba and hybrid patterns at the same dimensions; --sft
times this project's chat_sft too (the same rows of 8 x 512 on the model just trained).
"""
import os
import re
import sys
import shutil
import argparse
import statistics
import subprocess
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

parser = argparse.ArgumentParser(description="base_train tokens/s: this project vs a nanochat checkout, side by side")
parser.add_argument("--nanochat", required=True, help="a checkout of karpathy/nanochat")
parser.add_argument("--nanochat-python", default=sys.executable, help="a Python that has nanochat's dependencies")
parser.add_argument("--steps", type=int, default=60, help="training steps per run")
parser.add_argument("--rounds", type=int, default=1, help="run the trainers this many times, alternating")
parser.add_argument("--patterns", nargs="+", default=["TTTT"], help="this project's block patterns to run (TTTT is compared)")
parser.add_argument("--no-compile", action="store_true", help="run this project's trainer with --no-compile (eager)")
parser.add_argument("--also-no-compile", action="store_true", help="run each pattern both compiled (default) and with --no-compile")
parser.add_argument("--sft", action="store_true",
                    help="also time this project's chat_sft on the TTTT model just trained (rows of 8 x 512; nanochat's "
                         "chat_sft needs SmolTalk/MMLU/GSM8K downloads, so its base_train step, the same forward and "
                         "backward at the same shapes, is the reference)")
parser.add_argument("--short-conv", type=int, default=0, help="this project's --short-conv (0: plain attention, as nanochat)")
parser.add_argument("--docs-per-shard", type=int, default=3000, help="knowledge-world documents per parquet shard")
parser.add_argument("--keep", action="store_true", help="keep the temporary directory (printed)")
args = parser.parse_args()
if not os.path.isfile(os.path.join(args.nanochat, "scripts", "base_train.py")):
    sys.exit(f"--nanochat {args.nanochat}: no scripts/base_train.py there (a checkout of karpathy/nanochat?)")

DIMS = {"depth": 4, "aspect-ratio": 32, "head-dim": 32, "max-seq-len": 512, "device-batch-size": 8}
VOCAB, TOK_CHARS = 2048, 3_000_000


def run(cmd, cwd, base_dir, what):
    env = dict(os.environ, NANOCHAT_BASE_DIR=base_dir, PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    print(f"  {what} ...", flush=True)
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{what} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout + done.stderr


def median_tok_per_sec(log, pattern):
    rates = [float(m.replace(",", "")) for m in re.findall(pattern, log)]
    if len(rates) < 4:
        sys.exit(f"found {len(rates)} step lines with tokens/s in the log:\n{log[-2000:]}")
    return statistics.median(rates[len(rates) // 2:])


def write_shards(data_dirs, n_shards=3):
    """The embedded knowledge world as parquet shards (`text` column), the last one for validation."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    sys.path.insert(0, REPO)
    from tasks.pretraining import world_document
    for s in range(n_shards):
        docs = [world_document(s * args.docs_per_shard + i, "train") for i in range(args.docs_per_shard)]
        table = pa.table({"text": docs})
        for d in data_dirs:
            os.makedirs(d, exist_ok=True)
            pq.write_table(table, os.path.join(d, f"shard_{s:05d}.parquet"))


tmp = tempfile.mkdtemp(prefix="bench_vs_nanochat_")
try:
    nc_base, our_base = os.path.join(tmp, "nanochat"), os.path.join(tmp, "ours")
    our_data = os.path.join(our_base, "base_data")
    print(f"writing {3 * args.docs_per_shard:,} knowledge-world documents as parquet shards in {tmp}")
    # nanochat reads $NANOCHAT_BASE_DIR/base_data_climbmix (older checkouts: base_data)
    write_shards([os.path.join(nc_base, "base_data_climbmix"), os.path.join(nc_base, "base_data"), our_data])

    print("tokenizers (each trainer trains its own) ...")
    run([args.nanochat_python, "-m", "scripts.tok_train", f"--vocab-size={VOCAB}", f"--max-chars={TOK_CHARS}"],
        args.nanochat, nc_base, "nanochat tokenizer")
    run([sys.executable, "-m", "scripts.tok_train", "--data", our_data, "--vocab-size", str(VOCAB),
         "--max-chars", str(TOK_CHARS)], REPO, our_base, "this project's tokenizer")
    flag_sets = [["--no-compile"]] if args.no_compile else [[], ["--no-compile"]] if args.also_no_compile else [[]]
    results = {}   # name -> tokens/s of each round
    # rounds alternate the trainers, so a slow spell on a shared machine hits both, not one
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}:")
        log = run([args.nanochat_python, "-m", "scripts.base_train", *(f"--{k}={v}" for k, v in DIMS.items()),
                   "--total-batch-size=4096", f"--num-iterations={args.steps}", "--window-pattern=L",
                   "--eval-every=-1", "--core-metric-every=-1", "--sample-every=-1", "--run=dummy"],
                  args.nanochat, nc_base, f"nanochat base_train, {args.steps} steps")
        results.setdefault("nanochat TTTT", []).append(median_tok_per_sec(log, r"tok/sec: ([\d,]+)"))
        for pattern, flags in ((p, f) for p in args.patterns for f in flag_sets):
            cmd = [sys.executable, "-m", "scripts.base_train", *(f"--{k}={v}" for k, v in DIMS.items()),
                   f"--block-pattern={pattern}", "--data", our_data, f"--num-iterations={args.steps}",
                   "--eval-every=0", "--eval-tokens=8192", "--sample-every=0", f"--model-tag=bench_{pattern}",
                   f"--short-conv={args.short_conv}", *flags]
            log = run(cmd, REPO, our_base, f"this project's base_train {pattern} {' '.join(flags)}, {args.steps} steps")
            name = f"nanochat-rag {pattern}" + (f" conv{args.short_conv}" if args.short_conv else "") + "".join(f" {f}" for f in flags)
            results.setdefault(name, []).append(median_tok_per_sec(log, r"\| ([\d,]+) tok/s"))
            if args.sft and pattern == "TTTT":
                log = run([sys.executable, "-m", "scripts.chat_sft", "--source", "base", f"--model-tag=bench_{pattern}",
                           "--curriculum", "world1", f"--num-iterations={args.steps}", "--device-batch-size=8",
                           "--eval-every=0", "--eval-examples=2", *flags],
                          REPO, our_base, f"this project's chat_sft {pattern} {' '.join(flags)}, {args.steps} steps")
                rows = DIMS["device-batch-size"] * DIMS["max-seq-len"]
                ms = median_tok_per_sec(log, r"\| (\d+) ms \| total")
                results.setdefault(f"nanochat-rag chat_sft {pattern}" + "".join(f" {f}" for f in flags), []).append(rows / ms * 1000)

    ref = results["nanochat TTTT"]
    print(f"\ntokens/s (chat_sft: rows of tokens per second), median of steps {args.steps // 2 + 1}-{args.steps} "
          f"(depth 4, width 128, head dim 32, context 512, batch 8 x 512, vocab {VOCAB}); "
          f"{args.rounds} round(s), median over rounds, then each round's ratio:")
    for name, rates in results.items():
        per_round = " ".join(f"{a / b:.2f}" for a, b in zip(rates, ref))
        print(f"  {name:<40} {statistics.median(rates):>9,.0f}   {statistics.median(rates) / statistics.median(ref):.2f}x nanochat"
              f"   (rounds: {' '.join(f'{a:,.0f}' for a in rates)}; ratios {per_round})")
finally:
    if args.keep:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
