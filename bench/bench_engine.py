"""
Generation speed: how close the Engine's decode loop comes to the model's own forward speed.

For each block pattern and batch size, in the same run:
  ceiling  bare forward: the model stepping B rows of one token through the same kind of cache,
           no sampling, no tools (what decoding could cost if the Engine were free)
  engine   Engine.generate: B samples of one prompt, temperature 1, tokens sampled per second
and their ratio; with --compile also the bare forward under torch.compile (dynamic shapes; the
Engine itself does not compile, see docs/benchmarks.md). Then, given a trained chat model
(--base-dir, e.g. a speedrun's run directory), the RL rollout seconds per step at the speedrun's
settings: one question at a time (how chat_rl worked before) vs every question of the step in one
Engine run (how it works now).

    python -m bench.bench_engine                                      # random models, the speedrun's size
    python -m bench.bench_engine --base-dir runs/cpu_d4 --source rl   # + RL rollouts of that model
    python -m bench.bench_engine --compile                            # + the compiled bare forward
"""
import os
import time
import argparse

import torch

from nanochat.gpt import GPT, InferenceCache, config_from_depth
from nanochat.engine import Engine

parser = argparse.ArgumentParser(description="Engine decode tokens/s against the bare-forward ceiling, and RL rollout time")
parser.add_argument("--patterns", nargs="+", default=["TTTT", "MMMM", "TMTM"], help="block patterns to measure")
parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 64], help="rows decoded together")
parser.add_argument("--aspect-ratio", type=int, default=32, help="width = depth * aspect ratio (the CPU speedrun's)")
parser.add_argument("--head-dim", type=int, default=32)
parser.add_argument("--vocab-size", type=int, default=4096)
parser.add_argument("--prompt-tokens", type=int, default=256, help="prompt length (the cache the decode steps attend to)")
parser.add_argument("--decode-tokens", type=int, default=64, help="tokens decoded per row in each measurement")
parser.add_argument("--repeats", type=int, default=3, help="measurements per cell; the best is reported")
parser.add_argument("--compile", action="store_true", help="also time the bare forward compiled (torch.compile, dynamic shapes)")
parser.add_argument("--base-dir", default=None, help="a run directory with a chat checkpoint: also time RL rollouts")
parser.add_argument("--source", default="rl", choices=["sft", "rl"], help="which checkpoint of --base-dir")
parser.add_argument("--curriculum", default="world3:0.7+read1:0.3", help="RL prompts (the CPU speedrun's)")
parser.add_argument("--rl-steps", type=int, default=3, help="RL steps timed (8 questions x 8 samples each)")
args = parser.parse_args()


class Tok:
    """The few tokenizer methods the Engine needs, for a random model with no tokenizer on disk."""
    def __init__(self, vocab_size):
        names = ["<|bos|>", "<|assistant_end|>", "<|python_start|>", "<|python_end|>", "<|output_start|>",
                 "<|output_end|>", "<|search_start|>", "<|search_end|>", "<|doc_start|>", "<|doc_end|>"]
        self.special = {n: vocab_size - 1 - i for i, n in enumerate(names)}
        self.vocab_size = vocab_size

    def get_vocab_size(self):
        return self.vocab_size

    def decode_text(self, ids):
        return ""


def random_model(pattern):
    cfg = config_from_depth(len(pattern), args.vocab_size, 512, args.aspect_ratio, args.head_dim, pattern,
                            tie_embeddings=True)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights()
    with torch.no_grad():   # zero-initialised output projections would make the model trivial
        for p in model.parameters():
            if p.ndim == 2:
                p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


@torch.no_grad()
def ceiling(model, batch, forward=None):
    forward = model if forward is None else forward
    prompt = torch.randint(0, args.vocab_size - 16, (1, args.prompt_tokens))
    cache = InferenceCache(model, batch, args.prompt_tokens + args.decode_tokens + 8)
    for b in range(batch):
        model(prompt, cache=cache, rows=[b])
    x = torch.randint(0, args.vocab_size - 16, (batch, 1))
    t0 = time.perf_counter()
    for _ in range(args.decode_tokens):
        forward(x, cache=cache)
    return batch * args.decode_tokens / (time.perf_counter() - t0)


@torch.no_grad()
def engine_decode(model, tok, batch):
    prompt = torch.randint(0, args.vocab_size - 16, (args.prompt_tokens,)).tolist()
    engine = Engine(model, tok)
    gen = engine.generate(prompt, batch, max_tokens=args.decode_tokens + 1, temperature=1.0, seed=1)
    next(gen)   # prefill and the first token are not decode
    n, t0 = 0, time.perf_counter()
    for new_tokens, _, _ in gen:
        n += sum(len(t) for t in new_tokens)
    return n / (time.perf_counter() - t0)


print(f"threads {torch.get_num_threads()}, width = depth x {args.aspect_ratio}, vocab {args.vocab_size}, "
      f"prompt {args.prompt_tokens} tokens, {args.decode_tokens} decoded per row, best of {args.repeats}")
extra = " compiled bare forward tokens/s | compiled / eager | compiling s |" if args.compile else ""
print("| pattern | batch | bare forward tokens/s | Engine decode tokens/s | Engine / ceiling |" + extra)
print("|---|---|---|---|---|" + "---|---|---|" * args.compile)
for pattern in args.patterns:
    model = random_model(pattern.upper())
    tok = Tok(args.vocab_size)
    compiled = torch.compile(model, dynamic=True) if args.compile else None
    for batch in args.batch_sizes:
        top = max(ceiling(model, batch) for _ in range(args.repeats))
        eng = max(engine_decode(model, tok, batch) for _ in range(args.repeats))
        line = f"| {pattern} | {batch} | {top:,.0f} | {eng:,.0f} | {eng / top:.0%} |"
        if compiled is not None:
            t0 = time.perf_counter()
            ceiling(model, batch, compiled)   # compiles for this batch size
            compiling = time.perf_counter() - t0
            fast = max(ceiling(model, batch, compiled) for _ in range(args.repeats))
            line += f" {fast:,.0f} | {fast / top:.2f}x | {compiling:.1f} |"
        print(line, flush=True)

if args.base_dir:
    os.environ["NANOCHAT_BASE_DIR"] = os.path.abspath(args.base_dir)
    from nanochat.checkpoint_manager import load_model, find_model_tag
    from nanochat.rollout import rollout
    try:
        from nanochat.rollout import rollouts
    except ImportError:   # an older checkout (for a before/after comparison): one question at a time only
        rollouts = None
    from tasks.sft_data import build_mixture, add_kb_flags, parse_curriculum
    model, tokenizer, _ = load_model(args.source, "cpu", phase="eval", model_tag=find_model_tag(args.source))
    kb = argparse.ArgumentParser()
    add_kb_flags(kb)
    task_args = kb.parse_args([])
    task_args.stream_examples, task_args.seed, task_args.eval_examples = 10_000, 1, 100
    mixture = build_mixture(parse_curriculum(args.curriculum)[0], task_args, "train")
    timings = {"one question at a time": [], "all questions together": []}
    for step in range(args.rl_steps):
        picks = list(range(step * 8, step * 8 + 8))
        tasks, examples = [mixture.task_at(i) for i in picks], [mixture[i] for i in picks]
        t0 = time.perf_counter()
        for k, (task, example) in enumerate(zip(tasks, examples)):
            rollout(model, tokenizer, task, example, 8, 1.0, None, 48, seed=k, keep_stop=True)
        timings["one question at a time"].append(time.perf_counter() - t0)
        if rollouts is not None:
            t0 = time.perf_counter()
            rollouts(model, tokenizer, tasks, examples, 8, 1.0, None, 48, seed=step, keep_stop=True)
            timings["all questions together"].append(time.perf_counter() - t0)
    print(f"\nRL rollouts of {args.base_dir} ({args.source}), {args.curriculum}, 8 questions x 8 samples, "
          f"48 new tokens, mean of {args.rl_steps} steps:")
    for name, ts in timings.items():
        if ts:
            print(f"  {name}: {sum(ts) / len(ts):.2f} s/step")
