"""
Retrieval as data: wrappers that turn any Task into conversations that teach a model to
read retrieved documents (RAGTask) and to search again and again (MultiHopRAGTask, the
REFRAG-style multi-hop format), in the exact message format render_conversation knows.

- RAGTask inserts a {"role": "retrieval", "documents": [...]} message before the final user
  question: the documents the retriever really returns, distractors included, gold document
  not guaranteed.
- MultiHopRAGTask turns the final assistant answer into parts: a search (a query the model
  can write from what it has seen), the search_results the retriever really returns for it,
  repeated per hop of the gold chain, then the answer. A hop whose gold document the search
  misses gets a reformulated follow-up search, never a fabricated hit.

Retrieval runs in batches (one search_batch per block of examples) and finished examples are
cached, so a data loader walking a TaskMixture never waits on one query at a time.

    python -m tasks.rag --show 3 --task world --level 3
"""
import sys
import copy
import time
import random
import argparse
from abc import abstractmethod
from collections import OrderedDict

from tasks.common import Task
from nanochat.retrieval import Document, make_retriever

PREFETCH_BLOCK = 256   # examples retrieved together when the caller gave no prefetch hint
CACHE_SIZE = 8192      # finished examples kept (LRU); must exceed PREFETCH_BLOCK
PER_EXAMPLE = ("simple", "bm25", "dense", "hybrid")


def last_user_index(messages):
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    assert users, "a conversation to retrieve for needs a user message"
    return users[-1]


def example_retriever(example, kind="bm25"):
    """An in-memory retriever over an example's own little KB (example["kb"]): what the
    Engine should search when it rolls out a question of a streamed world or of HotpotQA."""
    assert "kb" in example, f"retrieving with {kind!r} per example needs example['kb'], which this example lacks"
    return make_retriever(kind, [Document(d["id"], d.get("title", ""), d["text"]) for d in example["kb"]])


def doc_dict(result):
    """A search result as it goes into a conversation: the parent document's id (a KB may
    return chunks), title and text, and the retriever's score (not rendered: ensemble decoding
    weighs documents by it)."""
    d = result.document
    return {"id": d.doc_id, "title": d.title, "text": d.text, "score": float(result.score)}


class _RetrievingTask(Task):
    """What both wrappers share. `retriever` is anything with search_batch(queries, top_k)
    (make_retriever(...), RetrievalManager), or the name of a retriever kind: then every
    example brings its own little KB as example["kb"] (streamed worlds, HotpotQA's ten
    paragraphs) and an in-memory retriever is built over it."""

    def __init__(self, base, retriever, top_k, **kwargs):
        super().__init__(**kwargs)
        if isinstance(retriever, str):
            assert retriever in PER_EXAMPLE, f"retriever must be a retriever object or one of {PER_EXAMPLE}"
        assert top_k >= 1, f"top_k must be positive, got {top_k}"
        self.base, self.retriever, self.top_k = base, retriever, top_k
        self.cache = OrderedDict()
        self.retrieval_seconds = 0.0   # time spent inside the retriever (index builds included)
        self.num_searches = 0

    @property
    def eval_type(self):
        return self.base.eval_type

    def num_examples(self):
        return len(self.base)

    def evaluate(self, conversation, completion):
        return self.base.evaluate(conversation, completion)

    def reward(self, conversation, completion):
        return self.base.reward(conversation, completion)

    def retriever_for(self, example):
        if not isinstance(self.retriever, str):
            return self.retriever
        t0 = time.perf_counter()
        r = example_retriever(example, self.retriever)
        self.retrieval_seconds += time.perf_counter() - t0
        return r

    def search_batch(self, retriever, queries):
        t0 = time.perf_counter()
        results = retriever.search_batch(queries, self.top_k)
        self.retrieval_seconds += time.perf_counter() - t0
        self.num_searches += len(queries)
        return results

    @abstractmethod
    def build(self, examples, indices):
        """The examples with their retrieval added (one batched search per call)."""

    def prefetch(self, indices):
        self._fill([self.physical_index(i) for i in indices])

    def _fill(self, indices):
        todo = [i for i in dict.fromkeys(indices) if i not in self.cache]
        if not todo:
            return
        # deep copies: base tasks may hand out shared objects, and we edit the messages
        examples = [copy.deepcopy(self.base[i]) for i in todo]
        for i, example in zip(todo, self.build(examples, todo)):
            self.cache[i] = example
        while len(self.cache) > CACHE_SIZE:
            self.cache.popitem(last=False)

    def get_example(self, index):
        if index not in self.cache:
            # no hint from the caller: assume it walks forward, retrieve the next block at once
            self._fill(range(index, min(index + PREFETCH_BLOCK, self.num_examples())))
        self.cache.move_to_end(index)
        # a copy: a caller editing its conversation must not change what the next caller gets
        return copy.deepcopy(self.cache[index])


class RAGTask(_RetrievingTask):
    """Any task, with the top_k documents retrieved for its final user message shown in a
    retrieval message right before it. Every other key of the example is kept.
    shuffle=True shows them in a random order (seeded by the example's index): retrievers
    tend to rank the gold document first, and then "copy from [1]" answers without reading
    which document is about what."""

    def __init__(self, base, retriever, top_k=3, shuffle=False, **kwargs):
        super().__init__(base, retriever, top_k, **kwargs)
        self.shuffle = shuffle

    def build(self, examples, indices):
        queries = [ex["messages"][last_user_index(ex["messages"])]["content"] for ex in examples]
        if isinstance(self.retriever, str):
            results = [self.search_batch(self.retriever_for(ex), [q])[0] for ex, q in zip(examples, queries)]
        else:
            results = self.search_batch(self.retriever, queries)
        for ex, res, index in zip(examples, results, indices):
            if self.shuffle:
                res = list(res)
                random.Random(index).shuffle(res)
            messages = ex["messages"]
            at = last_user_index(messages)
            assert at == 0 or messages[at - 1]["role"] != "retrieval", "this conversation already has retrieved documents"
            if at == 1 and messages[0]["role"] == "system":
                # render_conversation wants system right before user; merge them as it would
                messages[1] = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
                del messages[0]
                at = 0
            messages.insert(at, {"role": "retrieval", "documents": [doc_dict(r) for r in res]})
        return examples


class RandomDocuments(Task):
    """REPLUG's control: a RAG task whose retrieved documents are replaced by as many documents
    drawn at random (seeded by the example's index) from its retriever's collection, never one of
    the example's gold documents. Reading random documents should do no better than reading none."""

    def __init__(self, task, seed=0, **kwargs):
        super().__init__(**kwargs)
        if not hasattr(task, "retriever_for"):
            raise ValueError("--random-documents needs a task with retrieval")
        self.task, self.seed = task, seed

    @property
    def eval_type(self):
        return self.task.eval_type

    def num_examples(self):
        return len(self.task)

    def get_example(self, index):
        example = self.task[index]
        pool = self.task.retriever_for(example).documents
        gold = set(example.get("hops") or example.get("supporting_ids") or [])
        rng = random.Random(f"random-docs-{self.seed}-{index}")
        for m in example["messages"]:
            if m["role"] == "retrieval":
                picked = []
                while len(picked) < len(m["documents"]) and len(picked) < len(pool) - len(gold):
                    d = rng.choice(pool)
                    if d.doc_id not in gold and all(p["id"] != d.doc_id for p in picked):
                        picked.append({"id": d.doc_id, "title": d.title, "text": d.text})
                m["documents"] = picked
        return example

    def evaluate(self, conversation, completion):
        return self.task.evaluate(conversation, completion)

    def reward(self, conversation, completion):
        return self.task.reward(conversation, completion)


class MultiHopRAGTask(_RetrievingTask):
    """REFRAG-style conversations from a gold hop chain. The base example needs "hops" (gold
    document ids in reading order) and may give "queries" (one per hop); without them the
    first query is the question and later ones the title of that hop's gold document (a name
    the previous document shows). The final assistant message must be the answer string.
    max_hops caps the searches in one conversation, reformulations included. Examples get
    "gold_retrieved": whether every gold document was found (False: the conversation shows
    the real, failed searches; a trainer may prefer to skip it)."""

    def __init__(self, base, retriever, top_k=3, max_hops=4, **kwargs):
        super().__init__(base, retriever, top_k, **kwargs)
        self.max_hops = max_hops
        self.hops_total = 0
        self.hops_found_first_try = 0

    def title_of(self, example, retriever, doc_id):
        if "kb" in example:
            return next((d.get("title") or d["id"] for d in example["kb"] if d["id"] == doc_id), doc_id)
        if hasattr(retriever, "get"):   # RetrievalManager
            try:
                return retriever.get(doc_id).title or doc_id
            except KeyError:
                return doc_id
        if not hasattr(self, "_titles"):
            self._titles = {d.doc_id: d.title for d in retriever.documents}
        return self._titles.get(doc_id) or doc_id

    def plan(self, example, retriever):
        hops = example["hops"]
        assert hops, "MultiHopRAGTask needs examples with a non-empty 'hops' list"
        assert len(hops) <= self.max_hops, f"example needs {len(hops)} hops, max_hops is {self.max_hops}"
        queries = example.get("queries")
        if not queries:
            question = example["messages"][last_user_index(example["messages"])]["content"]
            queries = [question] + [self.title_of(example, retriever, h) for h in hops[1:]]
        assert len(queries) == len(hops), f"{len(queries)} queries for {len(hops)} hops"
        return list(zip(queries, hops))

    def build(self, examples, indices):
        retrievers = [self.retriever_for(ex) for ex in examples]
        plans = [self.plan(ex, r) for ex, r in zip(examples, retrievers)]
        # the gold chain fixes every hop's first query in advance: one batch for all of them
        if isinstance(self.retriever, str):
            first = [self.search_batch(r, [q for q, _ in plan]) for r, plan in zip(retrievers, plans)]
        else:
            flat = self.search_batch(self.retriever, [q for plan in plans for q, _ in plan])
            first, k = [], 0
            for plan in plans:
                first.append(flat[k:k + len(plan)])
                k += len(plan)
        for ex, retriever, plan, results in zip(examples, retrievers, plans, first):
            question = ex["messages"][last_user_index(ex["messages"])]["content"]
            answer = ex["messages"][-1]["content"]
            assert ex["messages"][-1]["role"] == "assistant" and isinstance(answer, str), \
                "MultiHopRAGTask needs a final assistant message with the answer as a string"
            parts, budget, complete = [], self.max_hops, True
            for h, ((query, gold), res) in enumerate(zip(plan, results)):
                parts += [{"type": "search", "text": query}, {"type": "search_results", "documents": [doc_dict(r) for r in res]}]
                budget -= 1
                found = gold in [r.document.doc_id for r in res]
                self.hops_total += 1
                self.hops_found_first_try += found
                title = self.title_of(ex, retriever, gold)
                tried = {query}
                for alt in (title, f"{question} {title}"):
                    # keep one search for each remaining hop
                    if found or budget <= len(plan) - h - 1:
                        break
                    if alt in tried:
                        continue
                    tried.add(alt)
                    res = self.search_batch(retriever, [alt])[0]
                    parts += [{"type": "search", "text": alt}, {"type": "search_results", "documents": [doc_dict(r) for r in res]}]
                    budget -= 1
                    found = gold in [r.document.doc_id for r in res]
                complete = complete and found
            parts.append({"type": "text", "text": answer})
            ex["messages"][-1] = {"role": "assistant", "content": parts}
            ex["gold_retrieved"] = complete
        return examples


# -----------------------------------------------------------------------------
# The knowledge-world curriculum

LEVELS = {           # level: (hops, documents per retrieval)
    1: (1, 1),       # copy a fact from the one document shown
    2: (1, 4),       # find the right document among distractors, then copy
    3: (2, 3),       # search, read, search again (2-hop bridges and comparisons)
    4: (3, 3),       # 3-hop chains
}


def world_task(level, split="train", rigid=False, num_examples=None, seed=0, retriever="bm25", shuffle=False,
               turns=1, unanswerable=False, search=False, comparisons=False):
    """The knowledge world at one curriculum level. split="train": fresh mini-worlds, each
    searched through its own in-memory retriever (default 100k examples). split="heldout":
    questions about the fixed held-out world, searched over its whole KB (default 500).
    shuffle: single-hop levels show the retrieved documents in random order (see RAGTask).
    turns > 1: each question is the last of a conversation of 2..turns (earlier ones as history);
    unanswerable: questions about entities the KB lacks, answered ABSTAIN (one hop: the search
    for the missing entity). search: single-hop levels too are answered by searching (as a chat
    in retrieval mode auto does) instead of reading documents retrieved for the question.
    comparisons: only comparison questions (at a single-hop level, both documents shown at once)."""
    from tasks.knowledge_world import WorldStream, WorldQA, heldout_world
    assert level in LEVELS, f"level must be one of {sorted(LEVELS)}, got {level}"
    hops, top_k = LEVELS[level]
    if split == "train":
        base, retrieve = WorldStream(hops, rigid, num_examples or 100_000, seed, turns, unanswerable, comparisons), retriever
    elif split == "heldout":
        world = heldout_world(seed, rigid)
        # unanswerable questions ask about another held-out world's entities (names never trained on either)
        base = WorldQA(world, hops, num_examples or 500, seed, turns, heldout_world(seed + 1, rigid) if unanswerable else None,
                       comparisons)
        retrieve = make_retriever(retriever, [Document(d["id"], d["title"], d["text"]) for d in world.documents()])
    else:
        raise ValueError(f"split must be train or heldout, got {split!r}")
    return RAGTask(base, retrieve, top_k, shuffle) if hops == 1 and not search else MultiHopRAGTask(base, retrieve, top_k)


# -----------------------------------------------------------------------------
# python -m tasks.rag --show N: print examples the way the model sees them

def describe(example):
    """A readable view of a conversation: roles, numbered documents, searches."""
    lines, n = [], 0

    def docs(documents, indent):
        nonlocal n
        for d in documents:
            n += 1
            lines.append(f"{indent}[{n}] {d['title']}: {d['text'][:160]}{'...' if len(d['text']) > 160 else ''}")

    for m in example["messages"]:
        if m["role"] == "retrieval":
            lines.append("RETRIEVED (shown to the model, never trained on):")
            docs(m["documents"], "    ")
        elif isinstance(m["content"], str):
            lines.append(f"{m['role'].upper()}: {m['content']}")
        else:
            lines.append(f"{m['role'].upper()}:")
            for p in m["content"]:
                if p["type"] == "search_results":
                    docs(p["documents"], "      ")
                else:
                    lines.append(f"    <{p['type']}> {p['text']}")
    return "\n".join(lines)


def masked_view(tokenizer, ids, mask):
    """The rendered tokens; trained-on spans (mask 1) in green on a terminal, else in [[ ]]."""
    tty = sys.stdout.isatty()
    out, k = [], 0
    while k < len(ids):
        j = k
        while j < len(ids) and mask[j] == mask[k]:
            j += 1
        text = tokenizer.decode(ids[k:j])
        out.append(text if not mask[k] else (f"\033[92m{text}\033[0m" if tty else f"[[{text}]]"))
        k = j
    return "".join(out)


def _task_from_args(args):
    from nanochat.retrieval import RetrievalManager
    if args.task in ("world", "heldout"):
        return world_task(args.level, "train" if args.task == "world" else "heldout", rigid=args.rigid, retriever=args.retriever)
    if args.task == "hotpotqa":
        from tasks.hotpotqa import HotpotQA
        base = HotpotQA(args.split or "validation", data_dir=args.data_dir)
        return MultiHopRAGTask(base, args.retriever, args.top_k)   # its own ten paragraphs per question
    if not args.kb:
        raise SystemExit(f"error: --task {args.task} needs --kb KB_DIR (built with python -m kb_tools.build_kb)")
    kb = RetrievalManager(args.kb, retriever=args.retriever)
    if args.task == "jsonl":
        from tasks.jsonl_qa import JsonlQA
        if not args.qa:
            raise SystemExit("error: --task jsonl needs --qa FILE.jsonl")
        base = JsonlQA(args.qa)
        return MultiHopRAGTask(base, kb, args.top_k) if args.multihop else RAGTask(base, kb, args.top_k)
    if args.task == "smoltalk":
        from tasks.smoltalk import SmolTalk
        base = SmolTalk(args.split or "test", data_dir=args.data_dir)
    elif args.task == "arc":
        from tasks.arc import ARC
        base = ARC("ARC-Easy", args.split or "test", data_dir=args.data_dir)
    elif args.task == "mmlu":
        from tasks.mmlu import MMLU
        base = MMLU("all", args.split or "test", data_dir=args.data_dir)
    else:
        from tasks.gsm8k import GSM8K
        base = GSM8K("main", args.split or "test", data_dir=args.data_dir)
    return RAGTask(base, kb, args.top_k)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="print RAG / multi-hop conversations as the model sees them")
    parser.add_argument("--show", type=int, default=3, help="how many examples")
    parser.add_argument("--task", default="world", choices=["world", "heldout", "jsonl", "hotpotqa", "smoltalk", "arc", "mmlu", "gsm8k"])
    parser.add_argument("--level", type=int, default=3, help="knowledge-world curriculum level (1-4)")
    parser.add_argument("--rigid", action="store_true", help="knowledge world: one article template, one phrasing")
    parser.add_argument("--retriever", default="bm25", help="simple | bm25 | dense | hybrid")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--kb", help="KB directory (jsonl, smoltalk, arc, mmlu, gsm8k)")
    parser.add_argument("--qa", help="QA jsonl file (--task jsonl)")
    parser.add_argument("--multihop", action="store_true", help="--task jsonl: search per hop (rows need 'hops')")
    parser.add_argument("--data-dir", help="local dataset copy: {config}/{split}/*.parquet")
    parser.add_argument("--split", help="dataset split")
    args = parser.parse_args()
    from nanochat.common import UserError
    try:
        task = _task_from_args(args)
    except (UserError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    examples = [task[i] for i in range(min(args.show, len(task)))]
    # a tiny tokenizer trained on the examples themselves: shows exactly what render_conversation makes
    from nanochat.tokenizer import Tokenizer
    texts = [describe(ex) for ex in examples]
    tokenizer = Tokenizer.train_from_iterator(iter(texts * 3), vocab_size=512)
    for i, (ex, text) in enumerate(zip(examples, texts)):
        ids, mask = tokenizer.render_conversation(ex)
        print(f"===== example {i} ({type(task).__name__} over {type(task.base).__name__}): "
              f"{len(ids)} tokens, {sum(mask)} trained on =====")
        print(text)
        print("----- rendered; trained-on tokens " + ("in green" if sys.stdout.isatty() else "in [[ ]]") + " -----")
        print(masked_view(tokenizer, ids, mask))
        print()
