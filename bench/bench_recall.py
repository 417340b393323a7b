"""
Associative-recall probe: does a block pattern learn to look values up in its context, and in
which learning-rate window? Okpekpe & Orvieto (2025) find that SSMs learn MQAR-style recall only
in a narrow LR window where Transformers are robust, so a pattern should be judged at its best LR,
found here in minutes rather than on the full task.

A tiny model is trained from scratch on tasks.recall.mqar_batch (key -> value pairs, then queries
of the keys; the loss is on the answers only), once per LR, and the table gives the held-out
recall accuracy (answers whose argmax is the value) after the last step:

    OMP_NUM_THREADS=1 python -m bench.bench_recall --patterns TTTT,MMMM   # ~5 CPU-minutes
    OMP_NUM_THREADS=1 python -m bench.bench_recall --patterns TMTM --inits induction --lrs 0.5,1,2

--lrs are multiples of base_train's learning rates (Muon 0.02 for block matrices; AdamW 0.2
embedding, 0.004 head, 0.004 Mamba conv/dt/A/D/norm), all scaled together. Each run uses the same
data and seed, so rows differ only by the LR.
"""
import argparse
import random
import time

import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import setup_optimizers, step_optimizers
from tasks.recall import mqar_batch

parser = argparse.ArgumentParser(description="learning-rate sweep on associative recall (MQAR) per block pattern and Mamba init")
parser.add_argument("--patterns", default="TTTT,MMMM", help="comma list of block patterns (one letter per layer)")
parser.add_argument("--inits", default="default,mimetic,induction", help="comma list of Mamba inits (patterns without M run once)")
parser.add_argument("--lrs", default="1,2,4,8,16", help="comma list of multipliers of base_train's learning rates")
parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
parser.add_argument("--batch-size", type=int, default=32, help="sequences per step")
parser.add_argument("--pairs", type=int, default=8, help="key-value pairs per sequence (all of them are queried)")
parser.add_argument("--vocab", type=int, default=128, help="vocabulary: keys from the lower half, values from the upper")
parser.add_argument("--width", type=int, default=64, help="model width (Mamba heads: 2*width/32; attention heads: width/32)")
parser.add_argument("--short-conv", type=int, default=4, help="T blocks' short conv taps, as base_train's (the CPU recipe uses 4)")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
if args.width % 32 or args.steps < 10:
    parser.error("--width must be a multiple of 32 (the head size) and --steps at least 10")

seq_len = 4 * args.pairs - 1
EVAL_ROWS = 512


def train_once(pattern, init, lr_mult):
    """Held-out recall accuracy and final training loss of one run."""
    torch.manual_seed(args.seed)
    config = GPTConfig(sequence_len=seq_len, vocab_size=args.vocab, n_layer=len(pattern), n_head=args.width // 32,
                       n_kv_head=args.width // 32, n_embd=args.width, block_pattern=pattern, mamba_init=init,
                       mamba_chunk_size=32, short_conv=args.short_conv)
    model = GPT(config)
    model.init_weights()
    optimizers = setup_optimizers(model, 0.02 * lr_mult, 0.2 * lr_mult, 0.004 * lr_mult, 0.004 * lr_mult)
    rng = random.Random(f"train-{args.seed}")   # the same batches for every run
    warmup, warmdown = args.steps // 10, args.steps // 5
    model.train()
    for step in range(args.steps):
        x, y = mqar_batch(rng, args.batch_size, args.pairs, args.vocab)
        loss = model(x, y)
        loss.backward()
        lrm = min((step + 1) / warmup, 1.0, (args.steps - step) / warmdown)
        step_optimizers(optimizers, lrm)
        model.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            return float("nan"), float("nan")
    model.eval()
    x, y = mqar_batch(random.Random(f"eval-{args.seed}"), EVAL_ROWS, args.pairs, args.vocab)
    with torch.no_grad():
        _, hits = model(x, y, with_hits=True)
    return hits.sum().item() / (y >= 0).sum().item(), loss.item()


runs = []
for pattern in args.patterns.upper().split(","):
    for init in (args.inits.split(",") if "M" in pattern else ["default"]):
        runs.append((pattern, init))
lrs = [float(v) for v in args.lrs.split(",")]
print(f"MQAR: {args.pairs} pairs, vocab {args.vocab}, {seq_len} tokens, width {args.width}, "
      f"{args.steps} steps x {args.batch_size} rows, {torch.get_num_threads()} thread(s); "
      f"held-out recall accuracy (final training loss)")
results = {}
for pattern, init in runs:
    t0 = time.time()
    for lr in lrs:
        results[pattern, init, lr] = train_once(pattern, init, lr)
    label = pattern if "M" not in pattern else f"{pattern} {init}"
    best = max(lrs, key=lambda lr: results[pattern, init, lr][0] if results[pattern, init, lr][0] >= 0 else -1)   # nan: diverged
    print(f"  {label}: {time.time() - t0:.0f} s, best LR x{best:g}: {results[pattern, init, best][0]:.1%}", flush=True)

names = [p if "M" not in p else f"{p} {i}" for p, i in runs]
print("\n| LR (x base_train) | " + " | ".join(names) + " |")
print("|---|" + "---|" * len(runs))
for lr in lrs:
    cells = [f"{results[p, i, lr][0]:.1%} ({results[p, i, lr][1]:.2f})" if results[p, i, lr][0] >= 0 else "diverged"
             for p, i in runs]
    print(f"| x{lr:g} | " + " | ".join(cells) + " |")
