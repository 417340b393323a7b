"""The associative-recall drill (tasks/recall.py): answers are exactly the values, keys are unique,
and it plugs into --data mixes, the SFT curriculum and the MQAR probe."""
import random
import re
from types import SimpleNamespace

from tasks.recall import draw_drill, recall_document, mqar_batch
from tasks.knowledge_world import TRAIN_NAMES, HELDOUT_NAMES


def test_drill_answers_are_exactly_the_values_and_keys_are_unique():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 40)
        pairs, queries = draw_drill(rng, TRAIN_NAMES, range(100, 1000), n, rng.randint(1, n))
        keys, values = [k for k, _ in pairs], [v for _, v in pairs]
        assert len(set(keys)) == n and len(set(values)) == n
        assert len({k for k, _ in queries}) == len(queries)
        assert all(dict(pairs)[k] == v for k, v in queries)


def test_pretraining_document():
    for i in range(50):
        text = recall_document(i)
        listed, asked = text.split("\n\n")
        pairs = dict(line.split(": ") for line in listed.splitlines())
        qa = re.findall(r"Q: (\w+)\?\nA: (\d+)", asked)
        assert len(pairs) == len(listed.splitlines()) and 4 <= len(pairs) <= 24   # keys unique
        assert len(qa) * 2 == len(asked.splitlines()) and len({q for q, _ in qa}) == len(qa) >= len(pairs) // 2
        assert all(pairs[q] == a for q, a in qa)
        assert set(pairs) <= set(TRAIN_NAMES)
    assert recall_document(3) == recall_document(3) != recall_document(4)   # a pure function of the index
    assert set(dict(l.split(": ") for l in recall_document(0, "val").split("\n\n")[0].splitlines())) <= set(HELDOUT_NAMES)


def test_in_a_data_mix():
    from nanochat.dataset import get_source
    from tasks.pretraining import GENERATED
    source = get_source("embedded:1+recall:1", "train", generated=GENERATED)
    docs = [source.get(i) for i in range(4)]
    assert sorted(docs.index(recall_document(k)) for k in (0, 1)) in ([0, 2], [1, 3])   # every other document


def test_chat_task_and_curriculum_entry():
    from tasks.sft_data import build_task
    args = SimpleNamespace(stream_examples=1000, eval_examples=20, seed=0, retriever="bm25")
    train, heldout = build_task("recall", args, "train"), build_task("recall", args, "heldout")
    assert len(train) == 1000 and len(heldout) == 20
    for task, names in ((train, set(TRAIN_NAMES)), (heldout, set(HELDOUT_NAMES))):
        for i in range(20):
            ex = task[i]
            question, answer = ex["messages"][0]["content"], ex["messages"][1]["content"]
            key = re.search(r"value of (\w+)\?$", question).group(1)
            pairs = dict(ex["pairs"])
            assert len(pairs) == len(ex["pairs"]) and set(pairs) <= names
            assert answer == str(pairs[key]) and ex["answers"] == [answer]
            assert f"{key}: {answer}" in question
            assert task.evaluate(ex, answer) == 1.0 and task.evaluate(ex, str(int(answer) + 1)) == 0.0


def test_mqar_batch_targets_are_the_queried_values():
    x, y = mqar_batch(random.Random(0), 8, 6, 64)
    assert x.shape == y.shape == (8, 4 * 6 - 1)
    for row, target in zip(x.tolist(), y.tolist()):
        pairs = dict(zip(row[0:12:2], row[1:12:2]))
        assert len(pairs) == 6 and all(0 < k < 32 <= v < 64 for k, v in pairs.items())
        asked = [(t, row[t]) for t in range(len(row)) if target[t] >= 0]
        assert [t for t, _ in asked] == list(range(12, 23, 2))   # every query, and nothing else
        assert all(target[t] == pairs[k] for t, k in asked)
        assert all(row[t + 1] == target[t] for t, _ in asked[:-1])   # the answer follows its query
