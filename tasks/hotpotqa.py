"""
HotpotQA, distractor setting (hotpotqa/hotpot_qa, config "distractor"): multi-hop questions,
each with 10 Wikipedia paragraphs (2 gold, 8 distractors) and the sentences that support
the answer. The paragraphs form a KB (per example as example["kb"], or all of them through
write_kb_input); the supporting facts give the gold hop chain.
https://huggingface.co/datasets/hotpotqa/hotpot_qa

    python -m tasks.hotpotqa --split validation --write-kb hotpot_kb.jsonl --write-qa hotpot_qa.jsonl
"""
import json
import argparse

from tasks.common import Task, hf_parquet_files, ParquetRows
from nanochat.rag import answer_text, exact_match, qa_reward


def _norm(s):
    return " ".join(s.lower().split())


def hop_order(question, gold, paragraphs):
    """Gold titles in reading order. For a bridge question the first hop is the paragraph
    the question names; the second is the one the first paragraph mentions."""
    if len(gold) != 2:
        return gold
    a, b = gold
    q = _norm(question)
    in_q = [t for t in gold if _norm(t) in q]
    if len(in_q) == 1:
        return [in_q[0], b if in_q[0] == a else a]
    # the bridge paragraph mentions the second hop's title
    text = {t: _norm(paragraphs.get(t, "")) for t in gold}
    if _norm(b) in text[a] and _norm(a) not in text[b]:
        return [a, b]
    if _norm(a) in text[b] and _norm(b) not in text[a]:
        return [b, a]
    return gold


class HotpotQA(Task):
    """split train | validation. Examples carry answers, hops (gold titles in order), queries
    (the question for the first hop of a bridge, then the bridge title; each title for a
    comparison), supporting_ids and kb (the 10 paragraphs)."""

    def __init__(self, split="validation", data_dir=None, **kwargs):
        super().__init__(**kwargs)
        assert split in ("train", "validation"), f"HotpotQA split must be train or validation, got {split!r}"
        self.rows = ParquetRows(hf_parquet_files("hotpotqa/hotpot_qa", "distractor", split, data_dir))

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return len(self.rows)

    @staticmethod
    def paragraphs(row):
        ctx = row["context"]
        return [{"id": t, "title": t, "text": "".join(s).strip()} for t, s in zip(ctx["title"], ctx["sentences"])]

    def get_example(self, index):
        row = self.rows[index]
        kb = self.paragraphs(row)
        gold = list(dict.fromkeys(row["supporting_facts"]["title"]))   # unique, in order
        hops = hop_order(row["question"], gold, {d["title"]: d["text"] for d in kb})
        if row["type"] == "comparison":
            queries = list(hops)
        else:
            queries = [row["question"]] + hops[1:]
        return {"messages": [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}],
                "answers": [row["answer"]], "hops": hops, "queries": queries, "supporting_ids": gold,
                "type": row["type"], "kb": kb}

    def evaluate(self, conversation, completion):
        return exact_match(answer_text(completion), conversation["answers"])

    def reward(self, conversation, completion):
        # F1 for multi-hop answers, as FlashRAG pins it: long entity names make EM too sparse
        return qa_reward(completion, conversation["answers"], metric="f1")

    def write_kb_input(self, path):
        """Every paragraph of the split once (by title), as kb_tools.build_kb input."""
        seen = set()
        with open(path, "w", encoding="utf-8") as f:
            for i in range(len(self.rows)):
                for doc in self.paragraphs(self.rows[i]):
                    if doc["id"] not in seen and doc["text"]:
                        seen.add(doc["id"])
                        f.write(json.dumps(doc) + "\n")

    def write_qa(self, path):
        """The questions in tasks.jsonl_qa's format, hop chain included."""
        with open(path, "w", encoding="utf-8") as f:
            for i in range(len(self)):
                ex = self[i]
                f.write(json.dumps({"question": ex["messages"][0]["content"], "answers": ex["answers"],
                                    "supporting_ids": ex["supporting_ids"], "hops": ex["hops"], "type": ex["type"]}) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="HotpotQA (distractor) as a KB input and a QA file")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--data-dir", default=None, help="local copy: {config}/{split}/*.parquet")
    parser.add_argument("--write-kb", help="jsonl for kb_tools.build_kb")
    parser.add_argument("--write-qa", help="jsonl for tasks.jsonl_qa / chat_eval --qa")
    args = parser.parse_args()
    task = HotpotQA(args.split, data_dir=args.data_dir)
    if args.write_kb:
        task.write_kb_input(args.write_kb)
    if args.write_qa:
        task.write_qa(args.write_qa)
    print(f"HotpotQA {args.split}: {len(task)} questions")
