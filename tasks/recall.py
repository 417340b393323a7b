"""
Associative-recall drills in the style of Zoology's MQAR (Arora et al. 2023): a list of
key -> value pairs, then queries of some of its keys, each answered by exactly its value. Only
the list can give an answer, so the loss on answers falls only by looking keys up in context:
the skill a model needs to read retrieved documents, in its barest form. Recurrent models are
slow to learn it (Zoology; Okpekpe & Orvieto 2025), which is why it is worth drilling.

- recall_document(i, split): pretraining text, e.g. `base_train --data embedded:1+recall:1`
  (tasks.pretraining.GENERATED);
- RecallDrills: a chat task, e.g. `chat_sft --curriculum recall,world1,...` (tasks.sft_data.build_task);
- mqar_batch: the same drill on raw token ids (keys and values from disjoint halves of the
  vocabulary), for bench/bench_recall.py.

Keys are knowledge-world names, values 3-digit numbers; keys and values are distinct within a
drill, so every answer is unambiguous. The held-out split uses only the held-out names.

    python -m tasks.recall --show 3 [--split heldout]
"""
import random
import argparse

import torch

from tasks.common import Task
from tasks.knowledge_world import TRAIN_NAMES, HELDOUT_NAMES
from nanochat.rag import answer_text, exact_match, qa_reward

VALUES = range(100, 1000)


def draw_drill(rng, keys, values, num_pairs, num_queries):
    """num_pairs (key, value) pairs, keys distinct and values distinct, and num_queries of those
    pairs (distinct, in a fresh order) to ask about: each query's answer is its pair's value."""
    pairs = list(zip(rng.sample(keys, num_pairs), rng.sample(values, num_pairs)))
    return pairs, rng.sample(pairs, num_queries)


def keys_for(split):
    """Training names for 'train'; the held-out names for 'heldout' (chat) and 'val' (pretraining)."""
    return TRAIN_NAMES if split == "train" else HELDOUT_NAMES


def pair_lines(pairs):
    return "\n".join(f"{k}: {v}" for k, v in pairs)


def recall_document(index, split="train"):
    """Pretraining document `index`: one drill of 4-24 pairs, then Q:/A: lines for half to all of
    its keys (the plain-text format of tasks.reading.pretraining_text): ~230 tokens with the CPU
    recipe's tokenizer (at most ~470), short next to its 512-token rows."""
    rng = random.Random(f"recall-pretrain-{split}-{index}")
    n = rng.randint(4, 24)
    pairs, queries = draw_drill(rng, keys_for(split), VALUES, n, rng.randint(max(1, n // 2), n))
    return pair_lines(pairs) + "\n\n" + "\n".join(f"Q: {k}?\nA: {v}" for k, v in queries)


class RecallDrills(Task):
    """Endless chat drills: the user gives 2-24 `key: value` lines (~120 tokens with the CPU recipe's
    tokenizer, at most ~210) and asks for one key's value; the answer is exactly that value."""

    def __init__(self, split="train", num_examples=100_000, seed=0, **kwargs):
        super().__init__(**kwargs)
        assert split in ("train", "heldout"), f"split must be train or heldout, got {split!r}"
        self.split, self.n, self.seed = split, num_examples, seed

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return self.n

    def get_example(self, index):
        rng = random.Random(f"recall-{self.split}-{self.seed}-{index}")
        pairs, [(key, value)] = draw_drill(rng, keys_for(self.split), VALUES, rng.randint(2, 24), 1)
        question = f"{pair_lines(pairs)}\n\nWhat is the value of {key}?"
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": str(value)}],
                "answers": [str(value)], "pairs": pairs, "type": "recall"}

    def evaluate(self, conversation, completion):
        return exact_match(answer_text(completion), conversation["answers"])

    def reward(self, conversation, completion):
        return qa_reward(completion, conversation["answers"])


def mqar_batch(rng, batch_size, num_pairs, vocab_size, num_queries=None):
    """MQAR on token ids: each row is k1 v1 ... kn vn, then q1 a1 ... qm am (m = num_queries, default
    n) with keys from [1, V/2) and values from [V/2, V) (0 is never used). Returns (x, y) for
    next-token training, y = -1 except where the next token is an answer a_i, i.e. at the queries."""
    half = vocab_size // 2
    m = num_pairs if num_queries is None else num_queries
    rows, targets = [], []
    for _ in range(batch_size):
        pairs, queries = draw_drill(rng, range(1, half), range(half, vocab_size), num_pairs, m)
        seq = [t for pair in pairs + queries for t in pair]
        rows.append(seq)
        targets.append([-1] * (2 * num_pairs) + [t for _, v in queries for t in (v, -1)])
    x = torch.tensor(rows)
    y = torch.tensor(targets)
    return x[:, :-1], y[:, :-1]   # y[t] is the token after x[t]: a query's target is its answer


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="print recall drills")
    parser.add_argument("--show", type=int, default=3, help="how many examples")
    parser.add_argument("--split", default="train", choices=["train", "heldout"])
    args = parser.parse_args()
    print(recall_document(0, "train" if args.split == "train" else "val"))
    print("-" * 80)
    task = RecallDrills(args.split)
    for i in range(args.show):
        print(task[i]["messages"][0]["content"], "->", task[i]["messages"][1]["content"])
        print("-" * 80)
