"""
Task API (slicing, mixtures, sequences) and the real dataset loaders, run on the small
parquet / jsonl fixtures in tests/fixtures (same column layout as the Hugging Face Hub).
"""
import os
import json

import pytest

from nanochat.common import UserError
from tasks.common import Task, TaskMixture, TaskSequence, hf_parquet_files
from tasks.smoltalk import SmolTalk
from tasks.mmlu import MMLU
from tasks.arc import ARC
from tasks.gsm8k import GSM8K, extract_answer
from tasks.hotpotqa import HotpotQA, hop_order
from tasks.jsonl_qa import JsonlQA

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


class Numbers(Task):
    """Example i says i; remembers prefetch hints."""

    def __init__(self, n, **kwargs):
        super().__init__(**kwargs)
        self.n, self.hints = n, []

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": "n?"}, {"role": "assistant", "content": str(index)}]}

    def prefetch(self, indices):
        self.hints.append(list(indices))


def value(example):
    return int(example["messages"][-1]["content"])


def test_task_slicing():
    t = Numbers(10, start=2, stop=9, step=3)
    assert len(t) == 3
    assert [value(t[i]) for i in range(len(t))] == [2, 5, 8]
    with pytest.raises(IndexError):
        t[3]
    assert len(Numbers(5)) == 5


def test_mixture_is_deterministic_complete_and_prefetches():
    a, b = Numbers(5), Numbers(7)
    mix = TaskMixture([a, b])
    assert len(mix) == 12
    seen = sorted(value(mix[i]) for i in range(len(mix)))
    assert seen == sorted(list(range(5)) + list(range(7)))
    again = TaskMixture([Numbers(5), Numbers(7)])
    assert [value(again[i]) for i in range(12)] == [value(mix[i]) for i in range(12)]
    # walking the mixture told each child its upcoming examples, in one block
    assert sorted(a.hints[0]) == list(range(5)) and sorted(b.hints[0]) == list(range(7))


def test_sequence_concatenates_in_order():
    seq = TaskSequence([Numbers(2), Numbers(3)])
    assert [value(seq[i]) for i in range(len(seq))] == [0, 1, 0, 1, 2]


def test_smoltalk_fixture():
    task = SmolTalk("test", data_dir=os.path.join(FIXTURES, "smoltalk"))
    assert len(task) == 3
    roles = sorted(tuple(m["role"] for m in task[i]["messages"]) for i in range(3))
    assert ("system", "user", "assistant") in roles
    assert ("user", "assistant", "user", "assistant") in roles


def test_mmlu_and_arc_fixtures():
    mmlu = MMLU("all", "test", data_dir=os.path.join(FIXTURES, "mmlu"))
    ex = next(mmlu[i] for i in range(len(mmlu)) if "gold" in mmlu[i]["messages"][0]["content"])
    assert ex["messages"][-1]["content"] == "B" and ex["letters"] == ("A", "B", "C", "D")
    assert "- Au=B" in ex["messages"][0]["content"] and ex["subject"] == "high_school_chemistry"
    assert mmlu.evaluate(ex, "B") == 1.0 and mmlu.evaluate(ex, "A") == 0.0
    arc = ARC("ARC-Easy", "test", data_dir=os.path.join(FIXTURES, "arc"))
    numeric = arc[1]
    assert numeric["letters"] == ("1", "2", "3") and numeric["messages"][-1]["content"] == "2"
    assert arc.evaluate(numeric, [{"type": "text", "text": "2"}]) == 1.0
    assert arc.eval_type == "categorical"


def test_gsm8k_fixture_tool_parts_and_eval():
    task = GSM8K("main", "test", data_dir=os.path.join(FIXTURES, "gsm8k"))
    ex = task[0]
    parts = ex["messages"][-1]["content"]
    assert {"type": "python", "text": "3*4"} in parts and {"type": "python_output", "text": "12"} in parts
    assert task.evaluate(ex, "so it is 10.\n#### 10") == 1.0
    assert task.evaluate(ex, "#### 11") == 0.0 and task.evaluate(ex, "10") == 0.0
    assert task.evaluate(task[1], "#### 2000") == 1.0   # "#### 2,000" in the reference
    assert extract_answer("x #### -3.5") == "-3.5"


def test_hotpotqa_fixture_hops_and_kb(tmp_path):
    task = HotpotQA("validation", data_dir=os.path.join(FIXTURES, "hotpotqa"))
    bridge = task[0]
    assert bridge["hops"] == ["Lake Tana", "Blue Nile"]            # the question names Lake Tana
    assert bridge["queries"] == [bridge["messages"][0]["content"], "Blue Nile"]
    assert len(bridge["kb"]) == 3 and bridge["answers"] == ["Mediterranean Sea"]
    comparison = task[1]
    assert comparison["type"] == "comparison" and comparison["queries"] == comparison["hops"]
    assert hop_order("q", ["A", "B"], {"A": "about b", "B": "x"}) == ["A", "B"]
    assert hop_order("q", ["A", "B"], {"A": "x", "B": "mentions a"}) == ["B", "A"]
    task.write_kb_input(tmp_path / "kb.jsonl")
    rows = [json.loads(line) for line in open(tmp_path / "kb.jsonl")]
    assert len(rows) == len({r["id"] for r in rows}) == 7   # deduplicated by title
    task.write_qa(tmp_path / "qa.jsonl")
    qa = JsonlQA(str(tmp_path / "qa.jsonl"))
    assert qa[0]["hops"] == ["Lake Tana", "Blue Nile"]


def test_jsonl_qa_and_its_errors(tmp_path):
    task = JsonlQA(os.path.join(FIXTURES, "qa.jsonl"))
    assert len(task) == 3 and task[0]["supporting_ids"] == ["eiffel"] and "hops" not in task[0]
    assert task[2]["hops"] == ["eiffel", "eiffel-g"]
    assert task.evaluate(task[0], "It opened in 1889.") == 0.0 and task.evaluate(task[0], "1889") == 1.0
    assert JsonlQA(os.path.join(FIXTURES, "qa.jsonl"), metric="f1").evaluate(task[1], "Paris, France") == pytest.approx(2 / 3)
    bad = tmp_path / "bad.jsonl"
    for content, message in [("", "no questions"), ('{"question": "q"}\n', ":1: 'answers'"),
                             ('{"question": "q", "answers": ["a"]}\n{nope\n', ":2: malformed JSON"),
                             ('{"question": "q", "answers": ["a"], "hops": ["x", "y"], "queries": ["x"]}\n', "one non-empty string per hop")]:
        bad.write_text(content)
        with pytest.raises(UserError, match=message):
            JsonlQA(str(bad))
    with pytest.raises(UserError, match="cannot read"):
        JsonlQA(str(tmp_path / "missing.jsonl"))


def test_loader_offline_fails_with_one_clear_line(tmp_path, monkeypatch):
    import requests
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))

    def offline(*args, **kwargs):
        raise requests.ConnectionError("no network")
    monkeypatch.setattr(requests, "get", offline)
    with pytest.raises(UserError) as err:
        GSM8K("main", "test")
    message = str(err.value)
    assert "\n" not in message and "openai/gsm8k" in message and "offline?" in message
    with pytest.raises(UserError, match="no parquet files"):
        hf_parquet_files("openai/gsm8k", "main", "train", data_dir=os.path.join(FIXTURES, "gsm8k"))


def test_loader_download_path_with_a_fake_hub(tmp_path, monkeypatch):
    """The online path: one API call lists the parquet URLs, each is saved once, then reused."""
    import requests
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    payload = open(os.path.join(FIXTURES, "gsm8k", "main", "test", "0000.parquet"), "rb").read()
    calls = []

    class Response:
        def __init__(self, url):
            self.url = url

        def raise_for_status(self):
            pass

        def json(self):
            return ["https://huggingface.co/fake/0000.parquet"]

        def iter_content(self, size):
            yield payload

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def fake_get(url, **kwargs):
        calls.append(url)
        return Response(url)
    monkeypatch.setattr(requests, "get", fake_get)
    task = GSM8K("main", "test")
    assert len(task) == 2 and calls[0] == "https://huggingface.co/api/datasets/openai/gsm8k/parquet/main/test"
    GSM8K("main", "test")
    assert len(calls) == 2   # second load came from the cache
