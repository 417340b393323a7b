"""
Supervised fine-tuning data: task mixtures as named on the command line, and packing of
rendered conversations into fixed-size rows.

Packing is best-fit: each row is filled with whole conversations (the largest one from a small
buffer that still fits), then padded. A conversation is never cut (one longer than a row is
rendered shorter by render_conversation, which trims documents first). seq_idx numbers the
conversations in a row so attention and Mamba state never cross from one to the next, and
targets are -1 wherever the render mask is 0 (user turns, documents, tool output, padding).
"""
import math
from collections import deque

import torch

from tasks.common import TaskMixture


def add_kb_flags(parser, heldout_split=False):
    """The flags build_task reads for the 'qa' task (your own QA file over your own KB);
    heldout_split: also --qa-heldout-frac (trainers hold documents out of training)."""
    parser.add_argument("--kb", default=None, help="knowledge base directory built by kb_tools.build_kb (for --qa)")
    parser.add_argument("--qa", default=None, help="JSONL file of {question, answers, supporting_ids?, hops?}")
    parser.add_argument("--multihop", action="store_true", help="--qa: the model writes its own searches (REFRAG) instead of RAG")
    parser.add_argument("--retriever", default="bm25", help="simple | bm25 | dense | hybrid")
    parser.add_argument("--embedding-model", default=None, help="dense/hybrid: must be the model the KB was built with (checked)")
    parser.add_argument("--query-encoder", default="tuned", choices=["tuned", "base"], help="dense/hybrid: tuned = the KB's trained query encoder when it has one (scripts.retriever_train), base = the embedding model")
    parser.add_argument("--top-k", type=int, default=3, help="documents per retrieval (knowledge-world levels fix their own)")
    if heldout_split:
        parser.add_argument("--qa-heldout-frac", type=float, default=0.2,
                            help="--qa: share of the documents whose questions are held out (never trained on); 0 = train on every question")


def build_task(name, args, split, seed=None, context_len=512):
    """One named task for a mixture. split 'train' streams fresh worlds (seed: which stream,
    default args.seed); 'heldout' is for evaluation. context_len: the model's, which the long
    entries of reading drills are sized for."""
    from tasks.rag import world_task, RAGTask, MultiHopRAGTask, LEVELS
    shuffle = split != "train" and getattr(args, "shuffle_documents", False)   # chat_eval's control: documents in random order
    kind = next((k for k in ("world", "turns", "abstain", "search", "chat", "compare", "shuffled") if name.startswith(k) and name[len(k):].isdigit()), None)
    if kind:
        # worldN: level N of the knowledge world; turnsN: its questions as the 2nd or 3rd turn of a chat;
        # abstainN: questions about entities the KB lacks, answered "The documents do not say.", alone or
        # as the 2nd/3rd turn of a chat, half of them naming something of another shape than the world's names,
        # at single-hop levels half with the documents shown and half searched by the model;
        # searchN: single-hop levels answered by the model's own search (a chat's retrieval mode auto);
        # chatN: both, a follow-up the model searches for (what the web UI's default mode asks);
        # compare2/compare3: only comparisons ("Which was founded first, A or B?"), both documents shown / searched
        # (a quarter of world3 is comparisons, and a small model answers them by position, not by the years);
        # shuffled2: world2 with its four documents in random order (BM25 ranks the asked entity's article
        # first, so in rank order "copy from document 1" passes without reading which one is about whom)
        level = int(name[len(kind):])
        levels = (2, 3) if kind == "compare" else (2,) if kind == "shuffled" else LEVELS
        if level not in levels:
            use = f"{kind}{min(levels)}" + (f"..{kind}{max(levels)}" if len(levels) > 1 else "")
            raise ValueError(f"unknown knowledge-world level {name!r}: use {use}")
        options = dict(turns=3 if kind in ("turns", "chat", "abstain") else 1, unanswerable=kind == "abstain",
                       search=kind in ("search", "chat"), retriever=args.retriever, comparisons=kind == "compare",
                       shuffle=shuffle or kind == "shuffled")
        stream_seed = (args.seed if seed is None else seed) if split == "train" else 0   # held out: the same questions every run
        if split == "train":
            make = lambda **o: world_task(level, "train", num_examples=args.stream_examples, seed=stream_seed, **o)
        else:
            make = lambda **o: world_task(level, "heldout", num_examples=args.eval_examples, **o)
        if kind == "abstain" and LEVELS[level][0] == 1:
            # a chat's default mode searches: "who wrote Hamlet?" is searched, found missing, abstained
            return TaskMixture([make(**options), make(**dict(options, search=True))], [1, 1], seed=stream_seed)
        return make(**options)
    if name in ("read1", "read2", "read3", "entries"):
        # entries: level-3 drills of long multi-field entries only (2-3 entries of one shape, key and headword to match)
        from tasks.reading import reading_task
        level, only = (3, ("entry",)) if name == "entries" else (int(name[4:]), None)
        if split == "train":
            return reading_task(level, "train", args.stream_examples, args.seed if seed is None else seed, only, context_len)
        return reading_task(level, "heldout", args.eval_examples, only=only, context_len=context_len)
    if name == "recall":   # key -> value recall drills (tasks.recall); held out: names never trained on
        from tasks.recall import RecallDrills
        if split == "train":
            return RecallDrills("train", args.stream_examples, args.seed if seed is None else seed)
        return RecallDrills("heldout", args.eval_examples)
    if name == "qa":
        from tasks.jsonl_qa import JsonlQA
        if not (args.qa and args.kb):
            raise ValueError("the 'qa' mixture entry needs --qa FILE.jsonl and --kb KB_DIR")
        retriever = open_kb(args.kb, args.retriever, args.embedding_model, args.query_encoder)
        frac = getattr(args, "qa_heldout_frac", 0)
        # split by document: held-out questions are about documents no training question touches
        base = JsonlQA(args.qa, split=split if frac > 0 else None, heldout_frac=frac)
        if args.multihop:
            return MultiHopRAGTask(base, retriever, args.top_k)
        return RAGTask(base, retriever, args.top_k, shuffle=shuffle)
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
    raise ValueError(f"unknown task {name!r} in --mixture (world1..world4, turns1..turns4, abstain1..abstain4, search1..search4, chat1..chat4, compare2..compare3, shuffled2, read1..read3, "
                     "entries, recall, qa, smoltalk, gsm8k, arc, mmlu, hotpotqa)")


def open_kb(kb_dir, retriever, embedding_model=None, query_encoder="tuned"):
    """A RetrievalManager; asking for an embedding model other than the KB's is an error there."""
    from nanochat.retrieval import RetrievalManager
    options = {"model": embedding_model} if embedding_model and retriever in ("dense", "hybrid") else {}
    return RetrievalManager(kb_dir, retriever=retriever, query_encoder=query_encoder, **options)


def parse_mixture(spec):
    """'world2:3,world3' -> [('world2', 0.75), ('world3', 0.25)]. A weight is a proportion of the
    examples drawn (no weight = 1), whatever the tasks' sizes; the weights are normalised to sum 1."""
    items = []
    for item in spec.split(","):
        entry = item.strip()
        name, _, weight = entry.partition(":")
        if not name:
            raise ValueError(f"mixture entry {entry!r}: expected name[:weight]")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            w = math.nan
        if not 0 < w < math.inf:   # also false for nan
            raise ValueError(f"mixture entry {entry!r}: the weight must be a positive number "
                             f"(a proportion: qa:1+world2:3 draws 25% qa, 75% world2)")
        items.append((name, w))
    total = sum(w for _, w in items)
    return [(name, w / total) for name, w in items]


def parse_curriculum(spec):
    """'world1,world2+world1:3' -> [[('world1', 1.0)], [('world2', 0.25), ('world1', 0.75)]]: stages of mixtures."""
    stages = [parse_mixture(stage.replace("+", ",")) for stage in spec.split(",") if stage.strip()]
    if not stages:
        raise ValueError("--curriculum needs at least one stage")
    return stages


def build_mixture(items, args, split="train", seed=None, context_len=512):
    """A TaskMixture of parsed (name, weight) items: each task takes its weight's share of the draws."""
    tasks = [build_task(name, args, split, seed, context_len) for name, _ in items]
    return TaskMixture(tasks, [w for _, w in items], seed=args.seed if seed is None else seed)


def conversation_exact_match(hits, targets, seq_idx):
    """(right, total) over the conversations of a packed batch that have supervised tokens: right
    when every supervised token is the argmax (hits, from GPT.forward(..., with_hits=True); teacher
    forced, so for an answer alone this is greedy exact match)."""
    supervised = targets >= 0
    wrong = supervised & ~hits
    conv = seq_idx + (seq_idx.max() + 1) * torch.arange(seq_idx.size(0), device=seq_idx.device)[:, None]
    n = int(conv.max()) + 1
    has = torch.zeros(n, device=hits.device).index_add_(0, conv.flatten(), supervised.flatten().float()) > 0
    bad = torch.zeros(n, device=hits.device).index_add_(0, conv.flatten(), wrong.flatten().float()) > 0
    return int((has & ~bad).sum()), int(has.sum())


def render(tokenizer, example, max_tokens):
    return tokenizer.render_conversation(example, max_tokens=max_tokens)


def packed_batches(task, tokenizer, batch_size, seq_len, rank=0, world_size=1, device="cpu", buffer_size=32):
    """Endless (x, y, seq_idx, source) batches from a task; rank r reads examples r, r+W, ...
    source (B, T) is the mixture's child task of each token's conversation (0 for a plain task,
    -1 on padding), so a trainer can measure each task's share of a batch on its own."""
    bos = tokenizer.get_bos_token_id()
    row_len = seq_len + 1
    buffer = deque()
    index = rank
    task_index = getattr(task, "task_index_at", lambda i: 0)

    def refill():
        nonlocal index
        while len(buffer) < buffer_size:
            i = index % len(task)
            ids, mask = render(tokenizer, task[i], row_len)
            buffer.append((ids, mask, task_index(i)))
            index += world_size

    while True:
        xs, ys, seqs, sources = [], [], [], []
        for _ in range(batch_size):
            ids, mask, seq, source = [], [], [], []
            n_conv = 0
            while True:
                refill()
                space = row_len - len(ids)
                best = max((k for k in range(len(buffer)) if len(buffer[k][0]) <= space),
                           key=lambda k: len(buffer[k][0]), default=None)
                if best is None:
                    break
                conv_ids, conv_mask, conv_source = buffer[best]
                del buffer[best]
                ids += conv_ids
                mask += conv_mask
                seq += [n_conv] * len(conv_ids)
                source += [conv_source] * len(conv_ids)
                n_conv += 1
            pad = row_len - len(ids)
            ids += [bos] * pad
            mask += [0] * pad
            seq += [n_conv] * pad
            source += [-1] * pad
            t = torch.tensor(ids)
            m = torch.tensor(mask)
            xs.append(t[:-1])
            ys.append(torch.where(m[1:] == 1, t[1:], torch.full_like(t[1:], -1)))
            seqs.append(torch.tensor(seq[:-1]))
            sources.append(torch.tensor(source[1:]))   # aligned with the targets
        yield (torch.stack(xs).to(device), torch.stack(ys).to(device), torch.stack(seqs).to(device),
               torch.stack(sources).to(device))
