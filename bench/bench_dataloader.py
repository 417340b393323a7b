"""
Data-loader benchmark: examples/s of the plain task vs RAGTask (BM25, dense) vs the streamed
knowledge-world curriculum (a BM25 index per example), and the share of an SFT step that
retrieval takes (target <= 5%).

SFT step time is measured on a tiny GPT forward/backward at the given batch shape (or pass
--step-time). Conversations per step = batch_size * seq_len / mean conversation length
(the SFT loader packs conversations into rows).

    python -m bench.bench_dataloader                    # ~1-2 minutes on 2 CPU cores
    python -m bench.bench_dataloader --no-dense --n 500
    python -m bench.bench_dataloader --no-dense --n 200 --curriculum world1,world3+world2+abstain2   # + SFT batches per stage
"""
import time
import argparse

import torch

from nanochat.tokenizer import Tokenizer
from nanochat.retrieval import Document, make_retriever
from tasks.knowledge_world import WorldQA, heldout_world, training_world, pretraining_documents
from tasks.rag import RAGTask, world_task

parser = argparse.ArgumentParser(description="examples/s of RAG data loading and retrieval's share of SFT step time")
parser.add_argument("--n", type=int, default=2000, help="examples per measurement")
parser.add_argument("--batch-size", type=int, default=16, help="SFT rows per step")
parser.add_argument("--seq-len", type=int, default=512, help="SFT tokens per row")
parser.add_argument("--depth", type=int, default=4, help="tiny model for the step-time estimate")
parser.add_argument("--width", type=int, default=256)
parser.add_argument("--step-time", type=float, default=None, help="SFT step seconds (skip the measurement)")
parser.add_argument("--no-dense", action="store_true", help="skip the dense retriever (loads MiniLM, encodes the KB)")
parser.add_argument("--curriculum", default=None,
                    help="also time chat_sft's packed batches (--batch-size x --seq-len) of each stage of this curriculum "
                         "(chat_sft's syntax, e.g. the speedrun's SFT_CURRICULUM): seconds per batch, beside the step time")
parser.add_argument("--batches", type=int, default=100, help="--curriculum: batches timed per stage (after one to warm up)")
args = parser.parse_args()

torch.manual_seed(0)
docs = pretraining_documents(0)
tokenizer = Tokenizer.train_from_iterator((next(docs) for _ in range(1000)), vocab_size=4096)

# -----------------------------------------------------------------------------
# SFT step time of a tiny model

if args.step_time is None:
    from nanochat.gpt import GPT, GPTConfig
    config = GPTConfig(sequence_len=args.seq_len, vocab_size=tokenizer.get_vocab_size(), n_layer=args.depth,
                       n_head=max(1, args.width // 64), n_kv_head=max(1, args.width // 64), n_embd=args.width)
    model = GPT(config)
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len))
    times = []
    for step in range(6):
        t0 = time.perf_counter()
        loss = model(x, targets=x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    step_time = sorted(times[1:])[len(times[1:]) // 2]   # median, first step excluded (warm-up)
    print(f"SFT step (d{args.depth} w{args.width}, {args.batch_size}x{args.seq_len} tokens, "
          f"{torch.get_num_threads()} threads): {step_time * 1000:.0f} ms measured")
else:
    step_time = args.step_time
    print(f"SFT step: {step_time * 1000:.0f} ms (given)")

# -----------------------------------------------------------------------------
# data loading


def measure(name, task):
    """Walk the task in order as a loader does; time getting + rendering each example."""
    n = min(args.n, len(task))
    t0 = time.perf_counter()
    tokens = 0
    for i in range(n):
        ids, _ = tokenizer.render_conversation(task[i], max_tokens=args.seq_len)
        tokens += len(ids)
    seconds = time.perf_counter() - t0
    retrieval = getattr(task, "retrieval_seconds", 0.0) / n
    per_step = args.batch_size * args.seq_len / (tokens / n)
    share = retrieval * per_step / (step_time + retrieval * per_step)
    print(f"{name:<44} {n / seconds:>9.0f} ex/s  {tokens / n:>5.0f} tok/ex  retrieval {retrieval * 1e6:>7.0f} us/ex"
          f"  {per_step:>5.0f} conv/step  retrieval share {100 * share:5.2f}%")
    return share


held = heldout_world()
held_docs = [Document(d["id"], d["title"], d["text"]) for d in held.documents()]
train = training_world()
train_docs = [Document(d["id"], d["title"], d["text"]) for d in train.documents()]
print(f"\n{'task':<44} {'speed':>13}  {'size':>12}  {'retrieval':>19}  {'batch':>14}")
shares = {}
measure("plain WorldQA (held-out, no retrieval)", WorldQA(held, 1, args.n))
shares["bm25 510"] = measure("RAGTask bm25 top-3 (held-out KB, 510 docs)", RAGTask(WorldQA(held, 1, args.n), make_retriever("bm25", held_docs), 3))
shares["bm25 3000"] = measure("RAGTask bm25 top-3 (train KB, 3000 docs)", RAGTask(WorldQA(train, 1, args.n), make_retriever("bm25", train_docs), 3))
shares["simple"] = measure("RAGTask simple top-3 (train KB, 3000 docs)", RAGTask(WorldQA(train, 1, args.n), make_retriever("simple", train_docs), 3))
if not args.no_dense:
    t0 = time.perf_counter()
    dense = make_retriever("dense", train_docs)
    print(f"{'  (dense: load MiniLM + encode 3000 docs once)':<44} {time.perf_counter() - t0:>8.1f} s")
    shares["dense"] = measure("RAGTask dense top-3 (train KB, 3000 docs)", RAGTask(WorldQA(train, 1, args.n), dense, 3))
shares["stream L2"] = measure("world level 2: stream, bm25 per example", world_task(2, num_examples=args.n))
shares["stream L3"] = measure("world level 3: stream 2-hop, bm25 per ex.", world_task(3, num_examples=args.n))
shares["stream L3 simple"] = measure("world level 3: stream 2-hop, simple per ex.", world_task(3, num_examples=args.n, retriever="simple"))
print(f"\nworst retrieval share of an SFT step: {100 * max(shares.values()):.2f}% ({max(shares, key=shares.get)}); target <= 5%")

# -----------------------------------------------------------------------------
# chat_sft's batches: whole stages of a curriculum, packed (nested mixtures, drills, searches and all)

if args.curriculum:
    from types import SimpleNamespace
    from tasks.sft_data import parse_curriculum, build_mixture, packed_batches
    options = SimpleNamespace(retriever="bm25", stream_examples=200_000, eval_examples=40, seed=0, kb=None, qa=None, top_k=3,
                              multihop=False)
    print(f"\nSFT batches of {args.batch_size}x{args.seq_len} tokens, {args.batches} per stage (step: {step_time * 1000:.0f} ms)")
    for k, items in enumerate(parse_curriculum(args.curriculum)):
        batches = packed_batches(build_mixture(items, options, "train", 1000 * k, args.seq_len), tokenizer, args.batch_size, args.seq_len)
        next(batches)   # the first fills the prefetch windows
        t0 = time.perf_counter()
        for _ in range(args.batches):
            next(batches)
        seconds = (time.perf_counter() - t0) / args.batches
        print(f"  stage {k} ({'+'.join(name for name, _ in items)}): {seconds * 1000:.0f} ms per batch, "
              f"{100 * seconds / (seconds + step_time):.0f}% of a step")
