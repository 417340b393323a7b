"""
MMLU (cais/mmlu): 4-way multiple choice over 57 subjects.
https://huggingface.co/datasets/cais/mmlu
"""
import random

from tasks.common import Task, hf_parquet_files, ParquetRows, render_mc
from nanochat.rag import answer_text


class MMLU(Task):
    """subset 'all' with split test | validation | dev, or 'auxiliary_train' with split train."""
    letters = ("A", "B", "C", "D")

    def __init__(self, subset, split, data_dir=None, **kwargs):
        super().__init__(**kwargs)
        assert subset in ("all", "auxiliary_train"), f"MMLU subset must be all or auxiliary_train, got {subset!r}"
        valid = ("train",) if subset == "auxiliary_train" else ("test", "validation", "dev")
        assert split in valid, f"MMLU {subset} has splits {valid}, got {split!r}"
        self.rows = ParquetRows(hf_parquet_files("cais/mmlu", subset, split, data_dir))
        self.order = list(range(len(self.rows)))
        random.Random(42).shuffle(self.order)

    @property
    def eval_type(self):
        return "categorical"

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[self.order[index]]
        if "train" in row:   # auxiliary_train rows are wrapped in a "train" struct on the Hub
            row = row["train"]
        return {
            "messages": [{"role": "user", "content": render_mc(row["question"], self.letters, row["choices"])},
                         {"role": "assistant", "content": self.letters[row["answer"]]}],
            "subject": row.get("subject", ""),   # for grouping results by subject
            "letters": self.letters,             # chat_eval takes the argmax over these tokens only
        }

    def evaluate(self, conversation, completion):
        return float(answer_text(completion) == conversation["messages"][-1]["content"])
