"""
SmolTalk (HuggingFaceTB/smol-smoltalk): general chat conversations for SFT.
https://huggingface.co/datasets/HuggingFaceTB/smol-smoltalk
"""
import random

from tasks.common import Task, hf_parquet_files, ParquetRows


class SmolTalk(Task):
    """split: train | test. data_dir: a local copy laid out as {config}/{split}/*.parquet."""

    def __init__(self, split, data_dir=None, **kwargs):
        super().__init__(**kwargs)
        assert split in ("train", "test"), f"SmolTalk split must be train or test, got {split!r}"
        self.rows = ParquetRows(hf_parquet_files("HuggingFaceTB/smol-smoltalk", "default", split, data_dir))
        self.order = list(range(len(self.rows)))
        random.Random(42).shuffle(self.order)   # the files are grouped by source; mix them

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        messages = [{"role": m["role"], "content": m["content"]} for m in self.rows[self.order[index]]["messages"]]
        # optional system message, then user/assistant alternating, ending with the assistant
        body = messages[1:] if messages and messages[0]["role"] == "system" else messages
        assert len(body) >= 2 and len(body) % 2 == 0, f"SmolTalk row {index}: expected user/assistant pairs"
        for i, m in enumerate(body):
            assert m["role"] == ("user" if i % 2 == 0 else "assistant"), f"SmolTalk row {index}: roles out of order"
        return {"messages": messages}
