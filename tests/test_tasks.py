"""
Task API (slicing, mixtures, sequences) and the real dataset loaders, run on the small
parquet / jsonl fixtures in tests/fixtures (same column layout as the Hugging Face Hub).
"""
import os
import json

import pytest

from nanochat.common import UserError
from tasks.common import Task, TaskMixture, TaskSequence, block_quotas, hf_parquet_files
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


def test_weighted_mixture_draws_proportions_whatever_the_sizes():
    tasks = [Numbers(7), Numbers(1000), Numbers(100_000)]
    mix = TaskMixture(tasks, [0.5, 0.3, 0.2], seed=3)
    counts = [0, 0, 0]
    for i in range(10_000):
        counts[tasks.index(mix.task_at(i))] += 1
    for count, weight in zip(counts, [0.5, 0.3, 0.2]):
        assert abs(count / 10_000 - weight) < 0.02, counts
    assert block_quotas([0.5, 0.3, 0.2]) == [5, 3, 2] and block_quotas([1, 3]) == [1, 3]
    assert block_quotas([1e-6, 1]) == [1, 10_000]   # rounded, but never to nothing


def test_weighted_mixture_walks_a_small_task_in_a_new_order_each_pass():
    small = Numbers(7)
    mix = TaskMixture([small, Numbers(1000)], [1, 1])
    walk = [value(mix[i]) for i in range(200) if mix.task_at(i) is small]
    assert len(walk) == 100   # 1:1 exactly over whole blocks
    passes = [walk[p * 7:(p + 1) * 7] for p in range(len(walk) // 7)]
    assert all(sorted(p) == list(range(7)) for p in passes)   # every example before any twice
    assert passes[0] != passes[1] and len({tuple(p) for p in passes}) > 5   # a new shuffle each pass
    # one epoch: within len(mix) draws every example of every task shows up
    a, b = Numbers(3), Numbers(50)
    epoch = TaskMixture([a, b], [1, 1])
    seen = {id(a): set(), id(b): set()}
    for i in range(len(epoch)):
        seen[id(epoch.task_at(i))].add(value(epoch[i]))
    assert seen == {id(a): set(range(3)), id(b): set(range(50))} and len(epoch) < 110


def test_weighted_mixture_is_a_pure_function_of_the_index():
    make = lambda: TaskMixture([Numbers(7), Numbers(1000), Numbers(100_000)], [0.5, 0.3, 0.2], seed=5)
    mix = make()
    forward = [(value(mix[i]), mix.tasks.index(mix.task_at(i))) for i in range(3000)]
    fresh = make()   # a fresh mixture read backwards (a resumed run, another rank) agrees
    assert [(value(fresh[i]), fresh.tasks.index(fresh.task_at(i))) for i in reversed(range(3000))] == forward[::-1]
    assert value(make()[123_457]) == value(mix[123_457])
    other_seed = TaskMixture(mix.tasks, [0.5, 0.3, 0.2], seed=6)
    assert [value(other_seed[i]) for i in range(50)] != [v for v, _ in forward[:50]]
    # ranks read draws r, r+W, ...: each rank still sees both tasks of a 1:1 mixture
    a, b = Numbers(5), Numbers(5)
    pair = TaskMixture([a, b], [1, 1])
    for rank in range(2):
        owners = [pair.task_at(i) for i in range(rank, 400, 2)]
        assert 70 < sum(t is a for t in owners) < 130


def test_a_nested_mixture_names_the_task_each_example_came_from():
    # RL curricula mix tasks that are mixtures themselves (single-hop abstainN): task_at is a leaf
    a, b, c = Numbers(3), Numbers(50), Numbers(100)
    offset = {id(a): 1000, id(b): 2000, id(c): 3000}
    for t in (a, b, c):
        t.get_example = (lambda base: lambda i: {"messages": [{"role": "user", "content": "n?"},
                                                              {"role": "assistant", "content": str(base + i)}]})(offset[id(t)])
    mix = TaskMixture([TaskMixture([a, b], [1, 1], seed=1), c], [1, 1], seed=2)
    for i in range(len(mix)):
        leaf = mix.task_at(i)
        assert leaf in (a, b, c) and value(mix[i]) // 1000 == offset[id(leaf)] // 1000


def test_weighted_mixture_prefetches_in_blocks():
    a, b = Numbers(7), Numbers(100_000)
    mix = TaskMixture([a, b], [1, 3])
    for i in range(256):
        mix[i]
    assert len(b.hints) == 1 and len(b.hints[0]) == 192   # one hint for the 3/4 of a 256-draw window


def test_mixture_weights_parse_as_proportions():
    from tasks.sft_data import parse_mixture, parse_curriculum
    assert parse_curriculum("qa:1+world2:3") == [[("qa", 0.25), ("world2", 0.75)]]
    assert parse_mixture("qa:0.5,world2:0.5") == [("qa", 0.5), ("world2", 0.5)]
    assert parse_curriculum("world1,world2+world1") == [[("world1", 1.0)], [("world2", 0.5), ("world1", 0.5)]]
    for bad in ("qa:0", "qa:-1", "qa:x", "qa:nan", "qa:inf"):
        with pytest.raises(ValueError, match=f"mixture entry '{bad}': the weight must be a positive number"):
            parse_curriculum(f"world1,{bad}+world2")
    with pytest.raises(ValueError, match="expected name"):
        parse_mixture("world1,,world2")


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
