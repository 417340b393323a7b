"""
Supervised fine-tuning data: task mixtures as named on the command line, and packing of
rendered conversations into fixed-size rows.

Packing is best-fit: each row is filled with whole conversations (the largest one from a small
buffer that still fits), then padded. A conversation is never cut (one longer than a row is
rendered shorter by render_conversation, which trims documents first). seq_idx numbers the
conversations in a row so attention and Mamba state never cross from one to the next, and
targets are -1 wherever the render mask is 0 (user turns, documents, tool output, padding).
"""
from collections import deque

import torch

from tasks.common import TaskMixture


def add_kb_flags(parser):
    """The flags build_task reads for the 'qa' task (your own QA file over your own KB)."""
    parser.add_argument("--kb", default=None, help="knowledge base directory built by kb_tools.build_kb (for --qa)")
    parser.add_argument("--qa", default=None, help="JSONL file of {question, answers, supporting_ids?, hops?}")
    parser.add_argument("--multihop", action="store_true", help="--qa: the model writes its own searches (REFRAG) instead of RAG")
    parser.add_argument("--retriever", default="bm25", help="simple | bm25 | dense | hybrid")
    parser.add_argument("--embedding-model", default=None, help="dense/hybrid: must be the model the KB was built with (checked)")
    parser.add_argument("--top-k", type=int, default=3, help="documents per retrieval (knowledge-world levels fix their own)")


def build_task(name, args, split, seed=None):
    """One named task for a mixture. split 'train' streams fresh worlds (seed: which stream,
    default args.seed); 'heldout' is for evaluation."""
    from tasks.rag import world_task, RAGTask, MultiHopRAGTask, LEVELS
    if name.startswith("world") and name[5:].isdigit():
        level = int(name[5:])
        if level not in LEVELS:
            raise ValueError(f"unknown knowledge-world level {name!r}: use world1..world{max(LEVELS)}")
        if split == "train":
            return world_task(level, "train", retriever=args.retriever, num_examples=args.stream_examples,
                              seed=args.seed if seed is None else seed)
        return world_task(level, "heldout", retriever=args.retriever, num_examples=args.eval_examples)
    if name == "qa":
        from tasks.jsonl_qa import JsonlQA
        if not (args.qa and args.kb):
            raise ValueError("the 'qa' mixture entry needs --qa FILE.jsonl and --kb KB_DIR")
        retriever = open_kb(args.kb, args.retriever, args.embedding_model)
        base = JsonlQA(args.qa)
        return MultiHopRAGTask(base, retriever, args.top_k) if args.multihop else RAGTask(base, retriever, args.top_k)
    train = split == "train"
    if name == "smoltalk":
        from tasks.smoltalk import SmolTalk
        return SmolTalk(split="train" if train else "test")
    if name == "gsm8k":
        from tasks.gsm8k import GSM8K
        return GSM8K(subset="main", split="train" if train else "test")
    if name == "arc":
        from tasks.arc import ARC
        return ARC(subset="ARC-Easy", split="train" if train else "test")
    if name == "mmlu":
        from tasks.mmlu import MMLU
        return MMLU(subset="auxiliary_train", split="train") if train else MMLU(subset="all", split="test")
    if name == "hotpotqa":
        from tasks.hotpotqa import HotpotQA
        return MultiHopRAGTask(HotpotQA(split="train" if train else "validation"), args.retriever, args.top_k)
    raise ValueError(f"unknown task {name!r} in --mixture (world1..world4, qa, smoltalk, gsm8k, arc, mmlu, hotpotqa)")


def open_kb(kb_dir, retriever, embedding_model=None):
    """A RetrievalManager; asking for an embedding model other than the KB's is an error there."""
    from nanochat.retrieval import RetrievalManager
    options = {"model": embedding_model} if embedding_model and retriever in ("dense", "hybrid") else {}
    return RetrievalManager(kb_dir, retriever=retriever, **options)


def parse_mixture(spec):
    """'world2:2,world3' -> [('world2', 2), ('world3', 1)]"""
    items = []
    for item in spec.split(","):
        name, _, weight = item.strip().partition(":")
        try:
            w = int(weight) if weight else 1
        except ValueError:
            raise ValueError(f"--mixture weight must be an integer, got {item!r}") from None
        if not name or w < 1:
            raise ValueError(f"--mixture entries look like name[:weight>=1], got {item!r}")
        items.append((name, w))
    return items


def parse_curriculum(spec):
    """'world1,world2+world1:2' -> [[('world1', 1)], [('world2', 1), ('world1', 2)]]: stages of mixtures."""
    stages = [parse_mixture(stage.replace("+", ",")) for stage in spec.split(",") if stage.strip()]
    if not stages:
        raise ValueError("--curriculum needs at least one stage")
    return stages


def build_mixture(items, args, split="train", seed=None):
    """A TaskMixture of parsed (name, weight) items."""
    tasks = []
    for name, weight in items:
        task = build_task(name, args, split, seed)
        tasks += [task] * weight   # oversample by listing a task again
    return TaskMixture(tasks)


def conversation_exact_match(logits, targets, seq_idx):
    """(right, total) over the conversations of a packed batch that have supervised tokens: right
    when every supervised token is the argmax (teacher forced; for an answer alone this is
    greedy exact match)."""
    supervised = targets >= 0
    wrong = supervised & (logits.argmax(-1) != targets)
    conv = seq_idx + (seq_idx.max() + 1) * torch.arange(seq_idx.size(0), device=seq_idx.device)[:, None]
    n = int(conv.max()) + 1
    has = torch.zeros(n, device=logits.device).index_add_(0, conv.flatten(), supervised.flatten().float()) > 0
    bad = torch.zeros(n, device=logits.device).index_add_(0, conv.flatten(), wrong.flatten().float()) > 0
    return int((has & ~bad).sum()), int(has.sum())


def render(tokenizer, example, max_tokens):
    return tokenizer.render_conversation(example, max_tokens=max_tokens)


def packed_batches(task, tokenizer, batch_size, seq_len, rank=0, world_size=1, device="cpu", buffer_size=32):
    """Endless (x, y, seq_idx) batches from a task; rank r reads examples r, r+W, ..."""
    bos = tokenizer.get_bos_token_id()
    row_len = seq_len + 1
    buffer = deque()
    index = rank

    def refill():
        nonlocal index
        while len(buffer) < buffer_size:
            ids, mask = render(tokenizer, task[index % len(task)], row_len)
            buffer.append((ids, mask))
            index += world_size

    while True:
        xs, ys, seqs = [], [], []
        for _ in range(batch_size):
            ids, mask, seq = [], [], []
            n_conv = 0
            while True:
                refill()
                space = row_len - len(ids)
                best = max((k for k in range(len(buffer)) if len(buffer[k][0]) <= space),
                           key=lambda k: len(buffer[k][0]), default=None)
                if best is None:
                    break
                conv_ids, conv_mask = buffer[best]
                del buffer[best]
                ids += conv_ids
                mask += conv_mask
                seq += [n_conv] * len(conv_ids)
                n_conv += 1
            pad = row_len - len(ids)
            ids += [bos] * pad
            mask += [0] * pad
            seq += [n_conv] * pad
            t = torch.tensor(ids)
            m = torch.tensor(mask)
            xs.append(t[:-1])
            ys.append(torch.where(m[1:] == 1, t[1:], torch.full_like(t[1:], -1)))
            seqs.append(torch.tensor(seq[:-1]))
        yield (torch.stack(xs).to(device), torch.stack(ys).to(device), torch.stack(seqs).to(device))
