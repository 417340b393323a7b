"""
torch.compile for fine-tuning steps, on a run directory's real checkpoints: ms per step, eager
against compiled, the variants interleaved step by step (medians, so a shared machine slows all alike).

  SFT  the base model on packed batches of the CPU recipe's third curriculum stage (8 rows x context):
       eager | the whole model compiled (the loss head then scores every position) | the trunk
       compiled and the sparse loss head eager (what chat_sft --compile does)
  RL   the SFT model's policy-gradient step over real rollouts (8 questions x 8 samples, length-sorted
       micro-batches of 16, as chat_rl): eager | trunk compiled with dynamic shapes | trunk compiled
       per fixed length, micro-batches right-padded to a multiple of --bucket tokens

    python -m bench.bench_compile --base-dir runs/cpu_final
    OMP_NUM_THREADS=1 python -m bench.bench_compile --base-dir runs/cpu_final   # a shared machine

Each variant first makes one pass over the batches (compiling every shape it meets), reported on its
own (with TORCHINDUCTOR_CACHE_DIR set to an empty directory it shows cold compiling; a rerun on the same
machine reuses torch's cache). The optimizer steps at a negligible learning rate, so every variant sees
the same weights.
"""
import os
import time
import math
import argparse
import statistics

import torch
import torch.nn.functional as F

parser = argparse.ArgumentParser(description="eager vs torch.compile ms per SFT and RL step on real checkpoints")
parser.add_argument("--base-dir", required=True, help="a run directory with base and SFT checkpoints (a speedrun's)")
parser.add_argument("--model-tag", default=None, help="checkpoint tag of the base and SFT models (default: the latest base model's)")
parser.add_argument("--steps", type=int, default=8, help="distinct batches (SFT) / RL steps of rollouts timed per round")
parser.add_argument("--rounds", type=int, default=3, help="passes over them; the order of the variants alternates")
parser.add_argument("--bucket", type=int, default=64, help="RL fixed-length variant: pad lengths to a multiple of this")
parser.add_argument("--skip", nargs="*", default=[], choices=["sft", "rl"], help="parts not to measure")
args = parser.parse_args()
os.environ["NANOCHAT_BASE_DIR"] = os.path.abspath(args.base_dir)

from nanochat.checkpoint_manager import load_model, find_model_tag  # noqa: E402 (reads NANOCHAT_BASE_DIR)
from nanochat.optim import setup_optimizers, step_optimizers  # noqa: E402
from nanochat.rollout import rollouts, rl_batch, policy_gradient_loss, length_buckets  # noqa: E402
from tasks.sft_data import add_kb_flags, build_mixture, packed_batches, parse_curriculum  # noqa: E402

task_parser = argparse.ArgumentParser()
add_kb_flags(task_parser, heldout_split=True)
task_args = task_parser.parse_args([])
task_args.stream_examples, task_args.seed, task_args.eval_examples = 2_000, 0, 10


def race(variants, batches, step):
    """{name: (seconds of a first pass over the batches, median ms per step after it)}; the first pass
    compiles every shape, the timed rounds interleave the variants batch by batch."""
    first = {}
    for name in variants:
        t0 = time.perf_counter()
        for batch in batches:
            step(name, batch)
        first[name] = time.perf_counter() - t0
    times = {name: [] for name in variants}
    for r in range(args.rounds):
        for batch in batches:
            for name in (variants if r % 2 == 0 else variants[::-1]):
                t0 = time.perf_counter()
                step(name, batch)
                times[name].append(time.perf_counter() - t0)
    return {name: (first[name], 1000 * statistics.median(times[name])) for name in variants}


def report(title, results, losses):
    eager = results["eager"][1]
    print(f"\n{title}\n| variant | first pass ({args.steps} steps) | ms/step (median) | vs eager | loss of the first batch |\n"
          "|---|---|---|---|---|")
    for name, (first, ms) in results.items():
        print(f"| {name} | {first:.1f} s | {ms:.0f} | {eager / ms:.2f}x | {losses[name]:.6f} |")


print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
model_tag = args.model_tag or find_model_tag("base")

if "sft" not in args.skip:
    model, tokenizer, _ = load_model("base", "cpu", phase="train", model_tag=model_tag)
    optimizers = setup_optimizers(model)
    stage = parse_curriculum("world3:0.4+world2:0.15+read1:0.2+read3:0.25")[0]
    gen = packed_batches(build_mixture(stage, task_args, "train"), tokenizer, 8, model.config.sequence_len)
    batches = [next(gen)[:3] for _ in range(args.steps)]
    whole = torch.compile(model, dynamic=False)
    trunk = torch.compile(model.trunk, dynamic=False)
    forward = {
        "eager": lambda x, y, s: model(x, y, seq_idx=s, with_hits=True),
        "whole model compiled": lambda x, y, s: whole(x, y, seq_idx=s, with_hits=True),
        "trunk compiled (chat_sft --compile)": lambda x, y, s: model.supervised_loss(trunk(x, seq_idx=s), y),
    }
    losses = {}

    def sft_step(name, batch):
        loss, _ = forward[name](*batch)
        loss.backward()
        step_optimizers(optimizers, 1e-9)
        model.zero_grad(set_to_none=True)
        losses.setdefault(name, loss.item())

    supervised = statistics.median(int((y >= 0).sum()) for _, y, _ in batches)
    report(f"SFT step, {model.config.block_pattern}, 8 x {model.config.sequence_len} tokens, median {supervised:.0f} with a target",
           race(list(forward), batches, sft_step), losses)

if "rl" not in args.skip:
    model, tokenizer, _ = load_model("sft", "cpu", phase="train", model_tag=model_tag)
    optimizers = setup_optimizers(model)
    mixture = build_mixture(parse_curriculum("world3:0.7+read1:0.3")[0], task_args, "train")
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    model.eval()
    steps = []
    for s in range(args.steps):
        picks = [s * 8 + k for k in range(8)]
        groups = rollouts(model, tokenizer, [mixture.task_at(i) for i in picks], [mixture[i] for i in picks], 8, 1.0,
                          None, 48, seed=s, keep_stop=True)
        samples = [sample for _, group in groups for sample in group]
        advantages = torch.randn(len(samples), generator=torch.Generator().manual_seed(s))
        num_tokens = sum(sum(sample["row"].mask[1:]) for sample in samples)
        steps.append([(*rl_batch([samples[i] for i in bucket], pad_id, "cpu"), advantages[bucket], num_tokens)
                      for bucket in length_buckets(samples, 16)])
    model.train()
    dynamic = torch.compile(model.trunk, dynamic=True)
    fixed = torch.compile(model.trunk, dynamic=False)

    def padded(x, y):
        pad = math.ceil(x.shape[1] / args.bucket) * args.bucket - x.shape[1]
        return F.pad(x, (0, pad), value=pad_id), F.pad(y, (0, pad), value=-1)   # right padding: causal, no target

    forward = {
        "eager": lambda x, y: (model(x, y, loss_reduction="none"), y),
        "trunk compiled, dynamic shapes": lambda x, y: (model.supervised_loss(dynamic(x), y, "none")[0], y),
        f"trunk compiled, lengths padded to x{args.bucket}":
            lambda x, y: (lambda xp, yp: (model.supervised_loss(fixed(xp), yp, "none")[0], yp))(*padded(x, y)),
    }
    losses = {}

    def rl_step(name, micro_batches):
        total = 0.0
        for x, y, adv, num_tokens in micro_batches:
            nll, targets = forward[name](x, y)
            loss = policy_gradient_loss(nll.view(targets.shape), targets, adv, num_tokens)
            loss.backward()
            total += loss.item()
        step_optimizers(optimizers, 1e-9)
        model.zero_grad(set_to_none=True)
        losses.setdefault(name, total)

    shapes = sorted({tuple(x.shape) for micro_batches in steps for x, *_ in micro_batches})
    report(f"RL policy-gradient step, {model.config.block_pattern}, micro-batches {shapes[0]} ... {shapes[-1]} "
           f"({len(shapes)} shapes)", race(list(forward), steps, rl_step), losses)
print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
