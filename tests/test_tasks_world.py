"""
The knowledge world: determinism, held-out names never produced by training worlds or the
pretraining stream, every answer stated in its gold documents, and 2-hop chains that the
project's own BM25 resolves (recall@5 >= 0.9 per hop) over the held-out KB.
"""
import re
import json
import random

from nanochat.rag import normalize_answer
from nanochat.retrieval import Document, make_retriever
from tasks.knowledge_world import (TRAIN_NAMES, HELDOUT_NAMES, ALL_NAMES, QUESTIONS, is_heldout_name, make_world,
                                   mini_world, training_world, heldout_world, WorldQA, WorldStream, pretraining_documents)
from tasks.jsonl_qa import JsonlQA

CAPITALISED = re.compile(r"\b[A-Z][a-z]+\b")


def test_name_partition_is_a_fixed_disjoint_split():
    assert set(TRAIN_NAMES).isdisjoint(HELDOUT_NAMES)
    assert len(TRAIN_NAMES) + len(HELDOUT_NAMES) == len(ALL_NAMES) == len(set(ALL_NAMES))
    assert 3000 < len(HELDOUT_NAMES) < len(TRAIN_NAMES)
    # short names: 2 syllables, at most 5 letters
    assert max(len(n) for n in ALL_NAMES) <= 5
    assert all(is_heldout_name(n) for n in HELDOUT_NAMES)


def test_worlds_are_deterministic_per_seed():
    assert make_world(3).documents() == make_world(3).documents()
    assert make_world(3).documents() != make_world(4).documents()
    assert heldout_world().documents() == heldout_world().documents()
    stream = WorldStream(hops=2, num_examples=50)
    assert [stream[i] for i in range(20)] == [WorldStream(hops=2, num_examples=50)[i] for i in range(20)]
    gen_a, gen_b = pretraining_documents(1), pretraining_documents(1)
    assert [next(gen_a) for _ in range(5)] == [next(gen_b) for _ in range(5)]


def test_training_side_never_produces_a_heldout_name():
    heldout = set(HELDOUT_NAMES)
    held = heldout_world()
    held_names = {d["id"] for d in held.documents()}
    assert held_names <= heldout
    train_text = [d["text"] for d in training_world().documents()]
    stream = WorldStream(hops=3, num_examples=2000)
    train_text += [json.dumps(stream[i]) for i in range(0, 2000, 5)]
    docs = pretraining_documents(0)
    train_text += [next(docs) for _ in range(500)]
    for text in train_text:
        words = set(CAPITALISED.findall(text))
        assert not (words & heldout), f"held-out name in training text: {words & heldout}"
    # and the held-out world's articles mention no training name
    train_names = set(TRAIN_NAMES)
    for d in held.documents():
        assert not (set(CAPITALISED.findall(d["text"])) & train_names)


def test_every_answer_is_stated_in_its_gold_documents():
    for world in (heldout_world(), heldout_world(rigid=True), mini_world(random.Random(7))):
        docs = {d["id"]: d for d in world.documents()}
        rng = random.Random(0)
        for hops in (1, 2, 3):
            for _ in range(300):
                q = world.question(rng, hops)
                assert len(q["hops"]) == (2 if q["type"] == "comparison" else hops)
                last = docs[q["hops"][-1]]
                gold_text = " ".join(docs[h]["title"] + " " + docs[h]["text"] for h in q["hops"])
                answer = normalize_answer(q["answers"][0])
                assert answer in normalize_answer(gold_text)
                if q["type"] != "comparison":   # the final fact sits in the last hop's article
                    assert answer in normalize_answer(last["text"])
                # each hop's query (a name) is in the question or in the previous hop's article
                for k, query in enumerate(q["queries"]):
                    seen = q["question"] if k == 0 else docs[q["hops"][k - 1]]["text"]
                    assert query in seen or (q["type"] == "comparison" and query in q["question"])


def test_question_wording_tells_the_answer_type_early():
    # within one kind, the first two words of the rigid phrasings differ between attributes
    for kind in ("person", "org", "work", "city"):
        firsts = [" ".join(p[0].split()[:2]) for (k, a), p in QUESTIONS.items() if k == kind]
        assert len(firsts) == len(set(firsts)), firsts


def test_two_hop_chains_resolve_with_project_bm25():
    """Every hop's query finds its gold article in the top 5 of the held-out KB, >= 90%."""
    for rigid in (False, True):
        world = heldout_world(rigid=rigid)
        bm25 = make_retriever("bm25", [Document(d["id"], d["title"], d["text"]) for d in world.documents()])
        rng = random.Random(1)
        for hops in (2, 3):
            questions = [world.question(rng, hops) for _ in range(200)]
            for k in range(hops):
                pairs = [(q["queries"][k], q["hops"][k]) for q in questions if len(q["hops"]) > k]
                results = bm25.search_batch([query for query, _ in pairs], 5)
                recall = sum(gold in [r.document.doc_id for r in res] for (_, gold), res in zip(pairs, results)) / len(pairs)
                assert recall >= 0.9, f"hop {k + 1} of {hops}-hop questions: recall@5 {recall:.2f}"


def test_qa_and_kb_files(tmp_path):
    world = heldout_world()
    world.write_kb_input(tmp_path / "kb.jsonl")
    kb = [json.loads(line) for line in open(tmp_path / "kb.jsonl")]
    assert len(kb) == 510 and set(kb[0]) == {"id", "title", "text"}
    world.write_qa(tmp_path / "qa2.jsonl", 50, hops=2)
    task = JsonlQA(str(tmp_path / "qa2.jsonl"))
    ids = {d["id"] for d in kb}
    for i in range(len(task)):
        ex = task[i]
        assert ex["hops"] and set(ex["hops"]) <= ids and ex["supporting_ids"] == ex["hops"]
        assert ex["queries"] == ex["hops"]   # world queries are the names themselves


def test_tasks_and_pretraining_text():
    stream = WorldStream(hops=1, rigid=True, num_examples=100)
    ex = stream[0]
    assert 10 <= len(ex["kb"]) <= 25 and ex["messages"][-1]["content"] == ex["answers"][0]
    assert stream.evaluate(ex, ex["answers"][0]) == 1.0 and stream.reward(ex, "nope") <= 0.1
    fixed = WorldQA(heldout_world(), hops=3, num_examples=10)
    assert len(fixed) == 10 and len(fixed[3]["hops"]) == 3
    docs = pretraining_documents(0)
    texts = [next(docs) for _ in range(300)]
    total = sum(len(t) for t in texts)
    assert total > 150_000 and len(set(texts)) == len(texts)
    assert all("<|" not in t for t in texts) and all("\nQ: " in t and "\nA: " in t for t in texts)
    for t in texts:   # every answer can be read from the articles above the questions
        articles, _, questions = t.partition("\nQ: ")
        answers = re.findall(r"^A: (.*)$", questions, re.M)
        assert answers and all(a in articles for a in answers)


def test_conversations_and_unanswerable_questions(tokenizer):
    from nanochat.rag import ABSTAIN, abstained, error_class
    from tasks.rag import world_task
    for split in ("train", "heldout"):
        # the 2nd or 3rd turn of a chat: earlier questions as text history, given, never trained on
        turns = world_task(1, split, num_examples=20, turns=3)
        kinds = set()
        for i in range(20):
            ex = turns[i]
            kinds.add(ex["type"])
            history = [m for m in ex["messages"][:-1] if m["role"] == "assistant"]
            assert history and all(m["trained"] is False for m in history) and "trained" not in ex["messages"][-1]
            ids, mask = tokenizer.render_conversation(ex)
            answer = tokenizer.encode_text(ex["answers"][0]) + [tokenizer.special["<|assistant_end|>"]]
            assert sum(mask) == len(answer) and [t for t, m in zip(ids, mask) if m] == answer   # only the last answer
        assert kinds == {"turn 2", "turn 3"}
        # about an entity the KB never mentions: the answer is ABSTAIN, whatever the search brings
        for level in (2, 3):
            task = world_task(level, split, num_examples=20, unanswerable=True, turns=3)
            with_earlier, foreign = 0, 0
            for i in range(20):
                ex = task[i]
                assert ex["answers"] == [ABSTAIN] and ex["type"] == "unanswerable"
                missing = ex["hops"][0]
                with_earlier += sum(m["role"] == "user" for m in ex["messages"]) > 1
                foreign += missing not in ALL_NAMES
                shown = [d for m in ex["messages"] if m["role"] == "retrieval" for d in m["documents"]]
                final = ex["messages"][-1]["content"]
                if not isinstance(final, str):
                    shown += [d for p in final if p["type"] == "search_results" for d in p["documents"]]
                    assert final[0] == {"type": "search", "text": missing} and final[-1] == {"type": "text", "text": ABSTAIN}
                assert missing in ex["messages"][-2]["content"] and not any(missing in d["text"] for d in shown)
            # alone or after earlier turns; half name something of another shape ("Showed Feed", not "Balun")
            assert 3 <= with_earlier <= 19 and 4 <= foreign <= 16, (with_earlier, foreign)
        # earlier turns sometimes asked about something the KB lacks, and were abstained
        histories = [m["content"] for i in range(20) for m in turns[i]["messages"][:-2] if m["role"] == "assistant"]
        assert 1 <= histories.count(ABSTAIN) <= len(histories) // 2, histories
        # single-hop, answered by the model's own search (a chat's retrieval mode auto)
        task = world_task(2, split, num_examples=5, search=True)
        for i in range(5):
            final = task[i]["messages"][-1]["content"]
            assert final[0]["type"] == "search" and final[-1] == {"type": "text", "text": task[i]["answers"][0]}
            assert not any(m["role"] == "retrieval" for m in task[i]["messages"])
    assert abstained("the documents do not say") and not abstained("Paris")
    assert error_class(ABSTAIN, False, ["d"], ["d"]) == "abstained"


def test_single_hop_abstention_is_shown_or_searched(monkeypatch):
    # abstain2: half the questions come with documents, half the model searches (a chat's default mode);
    # chat_eval scores each with the task it came from
    from types import SimpleNamespace
    from nanochat import rollout
    from nanochat.rag import ABSTAIN
    from tasks.sft_data import build_task
    args = SimpleNamespace(retriever="bm25", stream_examples=1000, eval_examples=40, seed=3)
    for split in ("train", "heldout"):
        task = build_task("abstain2", args, split)
        modes = [isinstance(task[i]["messages"][-1]["content"], list) for i in range(40)]
        assert 12 <= sum(modes) <= 28 and all(task[i]["answers"] == [ABSTAIN] for i in range(40))
    seen = []
    monkeypatch.setattr(rollout, "rollouts", lambda model, tok, tasks, examples, *a, **k: seen.extend(tasks) or [])
    monkeypatch.setattr(rollout, "prompt_budget", lambda *a: 0)
    model = SimpleNamespace(training=False, eval=lambda: None)
    rollout.evaluate_task(model, None, task, 40, batch_size=8)
    assert seen == [task.task_at(i) for i in range(40)] and len(set(map(id, seen))) == 2


def test_comparison_tasks_ask_only_comparisons_answered_by_the_years():
    from tasks.rag import world_task
    stream = WorldStream(hops=1, num_examples=300, comparisons=True)
    first_named = 0
    for i in range(300):
        ex = stream[i]
        assert ex["type"] == "comparison"
        a, b = ex["hops"]
        years = {e["id"]: int(re.search(r"\b1[789]\d\d|20[0-3]\d\b", e["text"]).group()) for e in ex["kb"] if e["id"] in (a, b)}
        assert ex["answers"] == [min((a, b), key=years.get)] and years[a] != years[b]
        first_named += ex["answers"][0] == a
    assert 100 < first_named < 200   # no position shortcut: the earlier one is named first about half the time
    shown = world_task(2, "heldout", num_examples=20, comparisons=True)
    for i in range(20):
        ex = shown[i]
        assert ex["messages"][0]["role"] == "retrieval" and ex["type"] == "comparison"
        assert set(ex["hops"]) <= {d["id"] for d in ex["messages"][0]["documents"]}   # both entities' documents shown
    searched = world_task(3, "heldout", num_examples=5, comparisons=True)
    assert all(searched[i]["type"] == "comparison" for i in range(5))


def test_training_worlds_invent_closed_set_values_and_the_heldout_world_does_not():
    from tasks.knowledge_world import PROFESSIONS, INDUSTRIES, GENRES, PRODUCTS, OPEN_VALUE_SHARE
    closed = {"job": PROFESSIONS, "industry": INDUSTRIES, "genre": GENRES, "known_for": PRODUCTS}
    values = [(k, e[k]) for seed in range(40) for e in make_world(seed).entities.values() for k in closed if k in e]
    invented = sum(v not in closed[k] for k, v in values) / len(values)
    assert abs(invented - OPEN_VALUE_SHARE) < 0.1   # a guess from the list is right at most half the time
    assert all(v.islower() and v[0] not in "aeiou" for k, v in values if v not in closed[k])
    held = [(k, e[k]) for e in heldout_world().entities.values() for k in closed if k in e]
    assert held and all(v in closed[k] for k, v in held)


def test_reading_probe_answers_are_in_its_articles_and_never_in_its_earlier_answers():
    from tasks.knowledge_world import reading_probe, CLOSED_ATTRIBUTES
    probes = reading_probe(60)
    assert probes == reading_probe(60)
    kinds = {k for _, _, k in probes}
    assert kinds == {"common word", "name or year"}
    for text, answers, kind in probes:
        articles, qa = text.split("\n\nQ: ", 1)
        assert text.endswith("\nA:") and answers[0] in articles
        assert f"A: {answers[0]}\n" not in text   # only the articles hold it
        assert not (set(CAPITALISED.findall(text)) & set(TRAIN_NAMES))   # held-out names only
