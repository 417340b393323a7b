"""
GSM8K (openai/gsm8k): grade-school math word problems. The reference solutions mark
calculator steps as <<48/2=24>>; they become python / python_output parts, so the model
learns to call the calculator tool and is handed its result.
https://huggingface.co/datasets/openai/gsm8k
"""
import re

from tasks.common import Task, hf_parquet_files, ParquetRows
from nanochat.rag import final_text

ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")


def extract_answer(text):
    """The number after '####', commas removed, or None."""
    m = ANSWER_RE.search(text)
    return m.group(1).strip().replace(",", "") if m else None


def solution_parts(answer):
    parts = []
    for piece in re.split(r"(<<[^>]*>>)", answer):
        if piece.startswith("<<") and piece.endswith(">>") and "=" in piece:
            expr, result = piece[2:-2].rsplit("=", 1)
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


class GSM8K(Task):
    """subset main | socratic, split train | test."""

    def __init__(self, subset, split, data_dir=None, **kwargs):
        super().__init__(**kwargs)
        assert subset in ("main", "socratic"), f"GSM8K subset must be main or socratic, got {subset!r}"
        assert split in ("train", "test"), f"GSM8K split must be train or test, got {split!r}"
        self.rows = ParquetRows(hf_parquet_files("openai/gsm8k", subset, split, data_dir))

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": solution_parts(row["answer"])}]}

    def evaluate(self, conversation, completion):
        reference = extract_answer("".join(p["text"] for p in conversation["messages"][-1]["content"] if p["type"] == "text"))
        predicted = extract_answer(final_text(completion))
        return float(predicted is not None and predicted == reference)
