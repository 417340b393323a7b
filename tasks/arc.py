"""
ARC (allenai/ai2_arc): grade-school science multiple choice, Easy and Challenge sets.
https://huggingface.co/datasets/allenai/ai2_arc
"""
from tasks.common import Task, hf_parquet_files, ParquetRows, render_mc
from nanochat.rag import answer_text


class ARC(Task):
    """subset ARC-Easy | ARC-Challenge, split train | validation | test."""

    def __init__(self, subset, split, data_dir=None, **kwargs):
        super().__init__(**kwargs)
        assert subset in ("ARC-Easy", "ARC-Challenge"), f"ARC subset must be ARC-Easy or ARC-Challenge, got {subset!r}"
        assert split in ("train", "validation", "test"), f"ARC split must be train, validation or test, got {split!r}"
        self.rows = ParquetRows(hf_parquet_files("allenai/ai2_arc", subset, split, data_dir))

    @property
    def eval_type(self):
        return "categorical"

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        letters = tuple(row["choices"]["label"])   # usually A-D, sometimes 1-4 or 3/5 options
        assert row["answerKey"] in letters, f"ARC row {index}: answer {row['answerKey']!r} not among {letters}"
        return {
            "messages": [{"role": "user", "content": render_mc(row["question"], letters, row["choices"]["text"])},
                         {"role": "assistant", "content": row["answerKey"]}],
            "letters": letters,
        }

    def evaluate(self, conversation, completion):
        return float(answer_text(completion) == conversation["messages"][-1]["content"])
