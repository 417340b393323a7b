"""
Training and generation throughput of the GPT on this machine, per depth and block pattern.

    python -m bench.bench_train                                  # depth 2 and 4, all-T
    python -m bench.bench_train --patterns TTTT MMMM TMTM        # Transformer vs Mamba vs hybrid

Training: forward+backward+optimizer step on random tokens (tokens/s). Generation: Engine
decode with the inference cache, batch 1 (tokens/s after the prompt).
"""
import time
import argparse

import torch

from nanochat.gpt import GPT, config_from_depth
from nanochat.optim import setup_optimizers
from nanochat.engine import Engine
from nanochat.tokenizer import Tokenizer

parser = argparse.ArgumentParser(description="CPU/GPU training and generation tokens/s per depth and block pattern")
parser.add_argument("--depths", type=int, nargs="+", default=[2, 4], help="depths to measure (all-T unless --patterns)")
parser.add_argument("--patterns", nargs="+", default=None, help="block patterns to measure (depth = pattern length)")
parser.add_argument("--seq-len", type=int, default=512)
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--vocab-size", type=int, default=4096)
parser.add_argument("--aspect-ratio", type=int, default=64)
parser.add_argument("--head-dim", type=int, default=64)
parser.add_argument("--steps", type=int, default=5, help="timed training steps (after 2 warm-up steps)")
parser.add_argument("--gen-tokens", type=int, default=64, help="tokens generated per generation measurement")
parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
parser.add_argument("--compile", action="store_true", help="also measure training with torch.compile (as base_train --compile)")
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# a throwaway tokenizer: generation needs its special tokens, not its merges
tokenizer = Tokenizer.train_from_iterator(iter(["a tiny corpus for the benchmark tokenizer"] * 10), 300)


def measure(pattern):
    config = config_from_depth(len(pattern), args.vocab_size, args.seq_len, args.aspect_ratio, args.head_dim, pattern)
    torch.manual_seed(0)
    model = GPT(config).to(device)
    model.init_weights()
    optimizers = setup_optimizers(model)
    x = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=device)

    def step(train_model=model):
        loss = train_model(x, x)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.time()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_tps = args.steps * args.batch_size * args.seq_len / (time.time() - t0)
    compiled_tps = float("nan")
    if args.compile:
        compiled = torch.compile(model, dynamic=False)
        for _ in range(2):   # compiles on the first call
            step(compiled)
        t0 = time.time()
        for _ in range(args.steps):
            step(compiled)
        compiled_tps = args.steps * args.batch_size * args.seq_len / (time.time() - t0)

    model.eval()
    engine = Engine(model, tokenizer)
    prompt = [tokenizer.get_bos_token_id()] + [5] * 31
    gen = engine.generate(prompt, 1, max_tokens=args.gen_tokens, temperature=1.0)
    next(gen)   # prefill + first token
    t0 = time.time()
    n = 0
    for _ in gen:
        n += 1
    gen_tps = n / max(time.time() - t0, 1e-9)
    return model.num_params(), train_tps, compiled_tps, gen_tps


patterns = args.patterns or ["T" * d for d in args.depths]
print(f"device {device}, threads {torch.get_num_threads()}, batch {args.batch_size} x {args.seq_len} tokens, vocab {args.vocab_size}")
print(f"| pattern | params | train tokens/s | compiled train tokens/s | generate tokens/s (batch 1) |")
print(f"|---|---|---|---|---|")
for pattern in patterns:
    params, train_tps, compiled_tps, gen_tps = measure(pattern.upper())
    print(f"| {pattern} | {params / 1e6:.2f}M | {train_tps:,.0f} | {compiled_tps:,.0f} | {gen_tps:,.0f} |", flush=True)
