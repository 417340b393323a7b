"""Reading drills, the held-out split by document, and the machine-made real QA sets."""
import os
import json

import pytest

from tasks.reading import ReadingDrills, SHAPES, HELDOUT_SHAPES, is_heldout
from tasks.jsonl_qa import JsonlQA, split_by_document
from kb_tools import machine_qa

WORDS = ("river stone window market signal engine garden letter winter summer number pocket bridge "
         "harbor silver copper forest candle mirror thunder meadow lantern anchor feather compass "
         "castle valley island violet orange purple yellow circle square triangle").split()
PARAGRAPHS = [f"The {w} keeps a record of every {v} it sees. Each entry names the {v} and the day it arrived. "
              f"Readers can look up any {w} by its number, and the index lists them in order of arrival."
              for w in WORDS[:12] for v in WORDS[12:14]]


def drills(level=3, split="train", n=400):
    words = [w for w in WORDS if is_heldout(w) == (split == "heldout")] or WORDS
    return ReadingDrills(level, split, n, seed=3, words=words, paragraphs=PARAGRAPHS)


@pytest.mark.parametrize("split,level", [("train", 3), ("heldout", 3), ("train", 1)])
def test_answers_are_spans_of_the_gold_document(split, level):
    task = drills(level=level, split=split)
    shapes = set()
    for i in range(len(task)):
        ex = task[i]
        gold = [d for d in ex["kb"] if d["id"] == ex["supporting_ids"][0]][0]
        assert ex["answers"][0] in gold["text"], (ex["type"], ex["answers"], gold["text"])
        assert ex["messages"][-1]["content"] == ex["answers"][0]
        shapes.add(ex["type"])
    if level == 1:
        assert shapes == {"rigid"}
    elif split == "train":
        assert shapes == set(SHAPES) - set(HELDOUT_SHAPES)   # every training shape shows up in 400 draws
    else:
        assert set(HELDOUT_SHAPES) <= shapes and "cloze" not in shapes


def test_drills_are_deterministic_and_fresh():
    a, b = drills(), drills()
    assert [a[i] for i in range(20)] == [b[i] for i in range(20)]
    assert len({json.dumps(a[i]["kb"]) for i in range(50)}) == 50   # a new little KB every example


def test_levels_one_and_two_have_only_the_gold_document():
    for level in (1, 2):
        task = drills(level=level)
        assert all(len(task[i]["kb"]) == 1 for i in range(50))
    rigid = drills(level=1)
    assert all(rigid[i]["type"] == "rigid" and rigid[i]["messages"][0]["content"].startswith("What is the ") for i in range(50))


def test_document_lines_start_like_answers(tokenizer):
    """A value at the start of a document line is the same tokens as the answer (leading space)."""
    ids = tokenizer.encode_document({"title": "t", "text": "name: x\nqueen river - a place"}, 1)
    answer = tokenizer.encode_text("queen river")
    assert any(ids[i:i + len(answer)] == answer for i in range(len(ids)))


def _rows(pairs):
    return [{"question": q, "answers": ["a"], "supporting_ids": ids, "hops": []} for q, ids in pairs]


def test_split_by_document_never_shares_a_document():
    rows = _rows([(f"q{i}", [f"d{i % 40}"] + ([f"d{(i * 7) % 40}"] if i % 3 == 0 else [])) for i in range(300)])
    train, heldout = split_by_document(rows, 0.2)
    assert train and heldout and len(train) + len(heldout) == len(rows)
    train_docs = {d for r in train for d in r["supporting_ids"]}
    heldout_docs = {d for r in heldout for d in r["supporting_ids"]}
    assert not train_docs & heldout_docs
    assert split_by_document(rows, 0.2) == (train, heldout)   # deterministic


def test_jsonl_qa_splits(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows([(f"q{i}", [f"d{i % 30}"]) for i in range(200)])))
    train, heldout, whole = JsonlQA(str(path), split="train"), JsonlQA(str(path), split="heldout"), JsonlQA(str(path))
    assert len(train) + len(heldout) == len(whole)
    assert not {train[i]["supporting_ids"][0] for i in range(len(train))} & {heldout[i]["supporting_ids"][0] for i in range(len(heldout))}


def test_machine_qa_sets_are_spans(tmp_path):
    made = machine_qa.build(str(tmp_path), ["httpstatus", "errno", "pymeta", "dpkg"], max_questions=200)
    assert {"httpstatus", "errno", "pymeta"} <= set(made)   # these come with Python on every machine
    assert ("dpkg" in made) == os.path.exists(machine_qa.DPKG_STATUS)
    for name in {"pymeta", "dpkg"} & set(made):   # the multi-field sets: long entries, several keys asked
        docs = [json.loads(line) for line in open(tmp_path / f"{name}_kb.jsonl")]
        qs = [json.loads(line) for line in open(tmp_path / f"{name}_qa.jsonl")]
        assert sorted(len(d["text"]) for d in docs)[len(docs) // 2] > 400 and len({q["type"] for q in qs}) >= 4
    for name in made:
        docs = {d["id"]: d for d in map(json.loads, open(tmp_path / f"{name}_kb.jsonl"))}
        qs = [json.loads(line) for line in open(tmp_path / f"{name}_qa.jsonl")]
        assert len(qs) == made[name][1] > 50
        for q in qs:
            doc = docs[q["supporting_ids"][0]]
            assert q["answers"][0] in doc["title"] + "\n" + doc["text"]


def test_make_qa_asks_about_key_value_lines():
    from kb_tools.make_qa import make_questions
    docs = [{"id": "a", "title": "Aruba", "text": "name: Aruba\nalpha_3: ABW\n| capital | Oranjestad |\nA sentence: with a colon that is far too long to be a value here"},
            {"id": "b", "title": "Prose", "text": "Just a paragraph of text without fields."}]
    rows = make_questions(docs, max_per_doc=10, max_value_words=5)
    asked = {r["question"]: r["answers"][0] for r in rows}
    assert asked == {"What is the alpha 3 of Aruba?": "ABW", "What is the capital of Aruba?": "Oranjestad"}
    assert all(r["supporting_ids"] == ["a"] for r in rows)


def test_inline_records_tab_tables_and_near_miss_names():
    """Drills v3: values ended by punctuation on one line, tables with tab or comma columns, and
    distractor entries whose names share a word with the right one."""
    import random
    from tasks.reading import Vocab, record_drill, table_drill
    words = [f"word{chr(97 + i)}{chr(97 + j)}" for i in range(20) for j in range(20)]
    inline, seps, related = 0, set(), 0
    for i in range(200):
        rng = random.Random(i)
        docs, gold, question, answer = record_drill(Vocab(words, rng), rng, "inline", 3)
        text = docs[gold]["text"]
        assert answer in text and "\n" not in text
        inline += 1
        first = [d["title"].split() for d in docs]
        related += len(first[0]) == 2 and (len({t[0] for t in first}) == 1 or len({t[-1] for t in first}) == 1)
        rng = random.Random(1000 + i)
        docs, gold, question, answer = table_drill(Vocab(words, rng), rng, 1)
        seps.update(s for s in ("\t", ", ", " | ") if s in docs[0]["text"].split("\n")[0])
        assert answer in docs[gold]["text"]
    assert seps == {"\t", ", ", " | "}
    assert 40 < related < 140   # about 40% of the multi-document drills


def test_long_entries_need_the_key_and_the_headword():
    import random
    from tasks.reading import entry_drill, Vocab, ENTRY_CHARS, COMMON_KEYS, QUALIFIERS
    synonyms, near_misses, qualified = 0, 0, 0
    for seed in range(200):
        rng = random.Random(seed)
        docs, gold, question, answer = entry_drill(Vocab(list(WORDS), rng), rng, 3, PARAGRAPHS)
        text = docs[gold]["text"]
        assert answer in text and answer not in question and docs[gold]["title"].lower() in question.lower()
        assert text.count("\n") >= 5   # many fields, then prose
        assert sum(len(d["text"]) for d in docs) <= ENTRY_CHARS + 600   # fields and the head line beyond the prose budget
        synonyms += any(s in question for names in COMMON_KEYS.values() for s in names)
        titles = [d["title"] for d in docs]
        near_misses += any(a != b and a.split("-")[0].split()[0] == b.split("-")[0].split()[0] for a in titles for b in titles)
        # asked for a qualified key ("metadata version"): its plain twin holds another value of its kind
        words = question.lower().replace("?", "").split()
        qualified += any(q in words for q in QUALIFIERS)
    assert synonyms >= 15 and near_misses >= 40   # keys asked by another name; headwords sharing their first part
    assert 10 <= qualified <= 60


def test_long_entries_grow_with_the_context():
    # a model with twice the context reads entries with twice the prose (the entries task at 1024 tokens)
    from tasks.reading import ReadingDrills
    sizes, paragraphs = {}, [" ".join(PARAGRAPHS[i:i + 8]) for i in range(12)]   # real prose is long
    for context_len in (512, 1024):
        drills = ReadingDrills(3, "train", 40, words=list(WORDS), paragraphs=paragraphs, only=("entry",), context_len=context_len)
        sizes[context_len] = sum(len(d["text"]) for i in range(40) for d in drills[i]["kb"])
    assert sizes[1024] > 1.4 * sizes[512]
