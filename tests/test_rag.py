"""
RAG / REFRAG conversations: every wrapped conversation renders with documents and search
results at mask 0 and search queries and answers at mask 1 (checked token by token against
an independent reading of the special tokens); RAGTask over SmolTalk/ARC/GSM8K fixtures and
JSONL QA over a KB built by build_kb; MultiHopRAGTask over the knowledge world and a
HotpotQA fixture; reformulated searches on a miss; batched retrieval; scoring and rewards.
"""
import os
import sys
import subprocess

import pytest

from nanochat.tokenizer import Tokenizer
from nanochat.retrieval import Document, make_retriever, RetrievalManager
from nanochat.rag import (normalize_answer, exact_match, f1_score, answer_text, final_text, citations, search_queries,
                          retrieved_documents, gold_recall, qa_reward)
from tasks.common import TaskMixture
from tasks.smoltalk import SmolTalk
from tasks.arc import ARC
from tasks.gsm8k import GSM8K
from tasks.hotpotqa import HotpotQA
from tasks.jsonl_qa import JsonlQA
from tasks.knowledge_world import WorldStream
from tasks.rag import RAGTask, MultiHopRAGTask, world_task, LEVELS

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tokenizer():
    texts = [open(os.path.join(FIXTURES, f)).read() for f in ("qa.jsonl", "qa_kb.jsonl")]
    texts += [str(WorldStream(hops=2, num_examples=50)[i]) for i in range(50)]
    return Tokenizer.train_from_iterator(iter(texts), vocab_size=512)


@pytest.fixture(scope="module")
def qa_kb(tmp_path_factory):
    from nanochat.retrieval.kb import build_kb
    out = str(tmp_path_factory.mktemp("kb") / "qa_kb")
    build_kb([os.path.join(FIXTURES, "qa_kb.jsonl")], out, retrievers=["simple", "bm25"], show_progress=False, log=lambda *a: None)
    return RetrievalManager(out, retriever="bm25")


def expected_mask(tokenizer, ids):
    """The mask each token must have, read off the special tokens alone."""
    S = tokenizer.special
    supervised_specials = {S[k] for k in ("<|assistant_end|>", "<|search_start|>", "<|search_end|>",
                                          "<|python_start|>", "<|python_end|>")}
    state, stack, out = "none", [], []
    for t in ids:
        if t == S["<|user_start|>"]:
            state = "user"
            out.append(0)
        elif t == S["<|assistant_start|>"]:
            state = "assistant"
            out.append(0)
        elif t in (S["<|doc_start|>"], S["<|output_start|>"]):
            stack.append(state)
            state = "injected"
            out.append(0)
        elif t in (S["<|doc_end|>"], S["<|output_end|>"]):
            state = stack.pop()
            out.append(0)
        elif t in supervised_specials:
            out.append(1)
            if t == S["<|assistant_end|>"]:
                state = "none"
        elif t == S["<|user_end|>"]:
            out.append(0)
            state = "none"
        else:
            out.append(1 if state == "assistant" else 0)
    return out


def check_rendering(tokenizer, conversation):
    """Render, compare the mask token by token, and check documents/queries/answer land where
    they should. Returns the decoded supervised text."""
    ids, mask = tokenizer.render_conversation(conversation, max_tokens=100_000, max_doc_tokens=100_000)
    assert mask == expected_mask(tokenizer, ids)
    S = tokenizer.special
    assert ids.count(S["<|doc_start|>"]) == ids.count(S["<|doc_end|>"])
    shown = [d for m in conversation["messages"] if m["role"] == "retrieval" for d in m["documents"]]
    for m in conversation["messages"]:
        if m["role"] == "assistant" and not isinstance(m["content"], str):
            shown += retrieved_documents(m["content"])
    assert ids.count(S["<|doc_start|>"]) == len(shown)
    unsupervised = tokenizer.decode([t for t, k in zip(ids, mask) if k == 0])
    supervised = tokenizer.decode([t for t, k in zip(ids, mask) if k == 1])
    for n, d in enumerate(shown, 1):
        assert f"[{n}] {d['title']}".strip() in unsupervised and d["text"] in unsupervised
    last = conversation["messages"][-1]
    for q in search_queries(last["content"]):
        assert f"<|search_start|> {q}<|search_end|>" in supervised
    content = last["content"]
    for text in [content] if isinstance(content, str) else [p["text"] for p in content if p["type"] == "text"]:
        assert text in supervised
    return supervised


# -----------------------------------------------------------------------------
# scoring

def test_normalisation_em_f1_citations():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert exact_match("the Nile.", ["Nile", "River Nile"]) == 1.0
    assert exact_match("Nile river", ["Nile"]) == 0.0
    assert f1_score("Nile river", ["Nile"]) == pytest.approx(2 / 3)
    assert f1_score("", ["Nile"]) == 0.0
    assert citations("Paris [2], see [1] and [2].") == [2, 1]
    parts = [{"type": "text", "text": "let me look"}, {"type": "search", "text": "eiffel tower"},
             {"type": "search_results", "documents": [{"id": "eiffel", "title": "Eiffel Tower", "text": "..."}]},
             {"type": "text", "text": "1889 [1]"}]
    assert answer_text(parts) == "1889" and final_text(parts) == "1889 [1]"
    assert search_queries(parts) == ["eiffel tower"]
    assert gold_recall([d["id"] for d in retrieved_documents(parts)], ["eiffel", "paris"]) == 0.5
    assert gold_recall([], []) == 1.0


def test_reward_depends_on_the_answer_whatever_the_format():
    answers = ["Toral"]
    results = {"type": "search_results", "documents": [{"id": "Balun", "title": "Balun", "text": "Balun was born in Toral."}]}
    right_plain = "Toral"
    right_searched = [{"type": "search", "text": "Balun"}, results, {"type": "text", "text": "Toral [1]"}]
    wrong_searched = [{"type": "search", "text": "Balun"}, results, {"type": "text", "text": "Kelto"}]
    wrong_plain = "Kelto"
    search_only = [{"type": "search", "text": "Balun"}, results, {"type": "search", "text": "Toral"}, results]
    answer_then_search = [{"type": "text", "text": "Toral"}, {"type": "search", "text": "Balun"}, results]
    junk_query = [{"type": "search", "text": " "}, results, {"type": "text", "text": "Toral"}]
    for completion in (right_plain, right_searched):
        assert qa_reward(completion, answers) >= 1.0
    for completion in (wrong_searched, wrong_plain, search_only, answer_then_search):
        assert qa_reward(completion, answers) <= 0.1
        assert qa_reward(completion, answers, metric="f1") <= 0.1
    assert qa_reward(search_only, answers) < qa_reward(wrong_searched, answers)   # no answer at all is worst
    assert qa_reward(junk_query, answers) < qa_reward(right_searched, answers)


# -----------------------------------------------------------------------------
# RAGTask

def test_ragtask_over_jsonl_qa_with_a_built_kb(tokenizer, qa_kb):
    task = RAGTask(JsonlQA(os.path.join(FIXTURES, "qa.jsonl")), qa_kb, top_k=2)
    assert len(task) == 3 and task.eval_type == "generative"
    for i in range(len(task)):
        ex = task[i]
        retrieval = ex["messages"][0]
        assert retrieval["role"] == "retrieval" and 1 <= len(retrieval["documents"]) <= 2
        assert "supporting_ids" in ex and "answers" in ex   # other keys kept
        check_rendering(tokenizer, ex)
    ex = task[0]
    assert ex["messages"][0]["documents"][0]["id"] == "eiffel"   # the real BM25 result
    assert task.evaluate(ex, "1889") == 1.0 and task.reward(ex, "1890") <= 0.1


def test_ragtask_over_smoltalk_arc_gsm8k(tokenizer, qa_kb):
    for base in (SmolTalk("test", data_dir=os.path.join(FIXTURES, "smoltalk")),
                 ARC("ARC-Easy", "test", data_dir=os.path.join(FIXTURES, "arc")),
                 GSM8K("main", "test", data_dir=os.path.join(FIXTURES, "gsm8k"))):
        task = RAGTask(base, qa_kb, top_k=2)
        for i in range(len(task)):
            ex, plain = task[i], base[i]
            messages = ex["messages"]
            at = max(k for k, m in enumerate(messages) if m["role"] == "user")
            assert messages[at - 1]["role"] == "retrieval"
            assert sum(m["role"] == "retrieval" for m in messages) == 1
            assert set(plain) <= set(ex)                      # letters etc. kept
            assert messages[-1] == plain["messages"][-1]
            check_rendering(tokenizer, ex)
    # the system message was merged into the user turn the documents precede, as render would
    smol = RAGTask(SmolTalk("test", data_dir=os.path.join(FIXTURES, "smoltalk")), qa_kb, top_k=1)
    nile = next(smol[i] for i in range(3) if "Egypt" in str(smol[i]))
    assert [m["role"] for m in nile["messages"]] == ["retrieval", "user", "assistant"]
    assert nile["messages"][1]["content"].startswith("You are a helpful assistant.\n\nName a river")
    arc = RAGTask(ARC("ARC-Easy", "test", data_dir=os.path.join(FIXTURES, "arc")), qa_kb, top_k=2)
    assert arc[0]["letters"] == ("A", "B", "C", "D") and arc.eval_type == "categorical"
    assert arc[0]["messages"][0]["documents"][0]["id"] == "photo"


class CountingRetriever:
    """Wraps a retriever and records every search_batch call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def search_batch(self, queries, top_k):
        self.calls.append(len(queries))
        return self.inner.search_batch(queries, top_k)


def world_retriever():
    from tasks.knowledge_world import heldout_world
    docs = [Document(d["id"], d["title"], d["text"]) for d in heldout_world().documents()]
    return make_retriever("bm25", docs)


def test_retrieval_is_batched_and_cached_even_inside_a_shuffled_mixture():
    from tasks.knowledge_world import WorldQA, heldout_world
    counting = CountingRetriever(world_retriever())
    task = RAGTask(WorldQA(heldout_world(), hops=1, num_examples=600), counting, top_k=3)
    for i in range(300):
        task[i]
    assert counting.calls == [256, 256]      # two blocks, no per-example queries
    counting2 = CountingRetriever(world_retriever())
    rag = RAGTask(WorldQA(heldout_world(), hops=1, num_examples=400, seed=1), counting2, top_k=3)
    plain = WorldStream(hops=1, num_examples=400)
    mix = TaskMixture([rag, plain])
    for i in range(len(mix)):
        mix[i]
    assert len(counting2.calls) <= 5 and sum(counting2.calls) == 400   # a few big batches, each query once
    # a weighted mixture inside a weighted one (abstain2 is one) gets its children's draws shuffled:
    # it retrieves what its parent said is coming, not a block after each of them
    counting3 = CountingRetriever(world_retriever())
    inner = TaskMixture([RAGTask(WorldQA(heldout_world(), hops=1, num_examples=3000, seed=2), counting3, top_k=3), plain], [1, 1])
    outer = TaskMixture([inner, WorldStream(hops=1, num_examples=3000, seed=3)], [1, 3])
    for i in range(2000):
        outer[i]
    assert 200 <= sum(counting3.calls) <= 2 * 256 and len(counting3.calls) <= 12


def test_shuffle_moves_the_gold_document():
    from tasks.knowledge_world import WorldQA, heldout_world
    base = WorldQA(heldout_world(), hops=1, num_examples=200)
    ranked, shuffled = RAGTask(base, world_retriever(), 4), RAGTask(base, world_retriever(), 4, shuffle=True)
    first = lambda t, i: t[i]["messages"][0]["documents"][0]["id"] == t[i]["hops"][0]
    assert sum(first(ranked, i) for i in range(200)) == 200
    assert sum(first(shuffled, i) for i in range(200)) < 170
    assert all(sorted(d["id"] for d in ranked[i]["messages"][0]["documents"]) ==
               sorted(d["id"] for d in shuffled[i]["messages"][0]["documents"]) for i in range(200))


def test_chat_evals_shuffle_documents_control_reorders_only_the_held_out_documents():
    import argparse
    from tasks.sft_data import build_task
    args = lambda shuffle: argparse.Namespace(retriever="bm25", seed=0, stream_examples=100, eval_examples=100, shuffle_documents=shuffle)
    ranked, shuffled = build_task("world2", args(False), "heldout"), build_task("world2", args(True), "heldout")
    ids = lambda t, i: [d["id"] for d in t[i]["messages"][0]["documents"]]
    assert all(ids(ranked, i)[0] == ranked[i]["hops"][0] for i in range(100))
    assert sum(ids(shuffled, i)[0] == shuffled[i]["hops"][0] for i in range(100)) < 70
    assert all(sorted(ids(ranked, i)) == sorted(ids(shuffled, i)) for i in range(100))


def test_shuffled2_is_world2_out_of_rank_order_in_training_too():
    import argparse
    from tasks.sft_data import build_task
    args = argparse.Namespace(retriever="bm25", seed=0, stream_examples=100, eval_examples=100, shuffle_documents=True)
    ids = lambda t, i: [d["id"] for d in t[i]["messages"][0]["documents"]]
    control, shuffled2 = build_task("world2", args, "heldout"), build_task("shuffled2", args, "heldout")
    assert all(ids(control, i) == ids(shuffled2, i) for i in range(100))   # the same as chat_eval's control
    args.shuffle_documents = False
    ranked, shuffled = build_task("world2", args, "train"), build_task("shuffled2", args, "train")
    assert sum(ids(ranked, i)[0] == ranked[i]["hops"][0] for i in range(100)) >= 90   # a mini-world's BM25: nearly always
    assert sum(ids(shuffled, i)[0] == shuffled[i]["hops"][0] for i in range(100)) < 70   # (over a quarter show only the gold one)
    with pytest.raises(ValueError, match="use shuffled2$"):
        build_task("shuffled3", args, "train")


# -----------------------------------------------------------------------------
# MultiHopRAGTask

def test_curriculum_levels_render_and_use_real_search_results(tokenizer):
    for level, (hops, top_k) in LEVELS.items():
        for split in ("train", "heldout"):
            task = world_task(level, split, num_examples=40)
            n_found = 0
            for i in range(40):
                ex = task[i]
                check_rendering(tokenizer, ex)
                if hops == 1:
                    assert ex["messages"][0]["role"] == "retrieval" and len(ex["messages"][0]["documents"]) <= top_k
                    n_found += ex["hops"][0] in [d["id"] for d in ex["messages"][0]["documents"]]
                    continue
                parts = ex["messages"][-1]["content"]
                queries = search_queries(parts)
                assert queries[:1] == ex["queries"][:1] and len(queries) >= hops
                # every search_results part is exactly what the retriever returns for its query
                retriever = (make_retriever("bm25", [Document(d["id"], d["title"], d["text"]) for d in ex["kb"]])
                             if split == "train" else task.retriever)
                for k, p in enumerate(parts):
                    if p["type"] == "search_results":
                        real = retriever.search(parts[k - 1]["text"], top_k)
                        assert [d["id"] for d in p["documents"]] == [r.document.doc_id for r in real]
                assert parts[-1] == {"type": "text", "text": ex["answers"][0]}
                assert gold_recall([d["id"] for d in retrieved_documents(parts)], ex["hops"]) == 1.0
                n_found += ex["gold_retrieved"]
                assert task.reward(ex, parts) >= 1.0
                assert task.reward(ex, parts[:-1]) == 0.05     # searches without an answer
            assert n_found >= 38, (level, split, n_found)


class MissingRetriever:
    """A retriever that never returns `hidden` for a query equal to `blocked`."""

    def __init__(self, inner, hidden, blocked):
        self.inner, self.hidden, self.blocked = inner, hidden, blocked
        self.get = inner.get   # titles come from the KB, as with a RetrievalManager

    def search_batch(self, queries, top_k):
        out = []
        for q, res in zip(queries, self.inner.search_batch(queries, top_k + 1)):
            res = [r for r in res if not (q == self.blocked and r.document.doc_id == self.hidden)]
            out.append(res[:top_k])
        return out


def test_a_missed_hop_gets_a_reformulated_search_not_a_fabricated_hit(tokenizer, qa_kb):
    base = JsonlQA(os.path.join(FIXTURES, "qa.jsonl"))
    question = base[2]["messages"][0]["content"]
    # without 'queries' the first search is the question, the second the gold title
    task = MultiHopRAGTask(base, qa_kb, top_k=2)
    assert search_queries(task[2]["messages"][-1]["content"])[:2] == [question, "Gustave Eiffel"]
    # hide the hop-2 article from its first query: a second search (title + question) finds it
    hiding = MissingRetriever(qa_kb, hidden="eiffel-g", blocked="Gustave Eiffel")
    task = MultiHopRAGTask(base, hiding, top_k=2)
    ex = task[2]
    parts = ex["messages"][-1]["content"]
    assert search_queries(parts) == [question, "Gustave Eiffel", f"{question} Gustave Eiffel"]
    results = [p for p in parts if p["type"] == "search_results"]
    assert "eiffel-g" not in [d["id"] for d in results[1]["documents"]]
    assert "eiffel-g" in [d["id"] for d in results[2]["documents"]]
    assert ex["gold_retrieved"] and task.hops_found_first_try == task.hops_total - 1
    check_rendering(tokenizer, ex)
    # a document no query can find stays missing, within the hop budget, and is flagged
    never = MissingRetriever(qa_kb, hidden="eiffel-g", blocked=None)
    never.search_batch = lambda queries, top_k: [[r for r in res if r.document.doc_id != "eiffel-g"]
                                                 for res in qa_kb.search_batch(queries, top_k)]
    ex = MultiHopRAGTask(base, never, top_k=2, max_hops=3)[2]
    parts = ex["messages"][-1]["content"]
    assert len(search_queries(parts)) == 3 and not ex["gold_retrieved"]
    assert "eiffel-g" not in [d["id"] for d in retrieved_documents(parts)]


def test_multihop_over_hotpotqa_fixture(tokenizer):
    task = MultiHopRAGTask(HotpotQA("validation", data_dir=os.path.join(FIXTURES, "hotpotqa")), "bm25", top_k=2)
    bridge = task[0]
    parts = bridge["messages"][-1]["content"]
    queries = search_queries(parts)
    assert queries[0] == bridge["messages"][0]["content"] and "Blue Nile" in queries
    assert bridge["gold_retrieved"] and parts[-1]["text"] == "Mediterranean Sea"
    assert len(bridge["kb"]) == 3
    check_rendering(tokenizer, bridge)
    comparison = task[1]
    assert search_queries(comparison["messages"][-1]["content"])[:2] == ["Scott Derrickson", "Ed Wood"]
    check_rendering(tokenizer, comparison)
    # HotpotQA's reward is F1-based: a partly right answer earns part of it
    assert 0.5 < task.reward(bridge, "the Mediterranean") < 1.0


def test_show_command_prints_readable_examples():
    out = subprocess.run([sys.executable, "-m", "tasks.rag", "--show", "2", "--task", "world", "--level", "3"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("===== example") == 2 and "<search>" in out.stdout
    assert "[[<|search_start|>" in out.stdout and "<|doc_start|>[1]" in out.stdout


def test_examples_are_copies_and_the_engine_can_search_an_examples_own_kb():
    from tasks.rag import example_retriever
    task = world_task(3, num_examples=5)
    ex = task[0]
    ex["messages"].clear()
    assert task[0]["messages"]                     # the cache was not touched
    ex = task[0]
    r = example_retriever(ex, "bm25")
    assert r.search(ex["queries"][0], 1)[0].document.doc_id == ex["hops"][0]


def test_overlap_metrics_match_the_libraries_and_error_classes():
    import sacrebleu
    from rouge_score import rouge_scorer
    from nanochat.rag import overlap_metrics, shown_rank_metrics, error_class, documents_containing
    preds = ["the old king was born in the river city", "Paris", "a cat sat on a red mat today"]
    refs = [["the old king was born in the river city of Tor"], ["Paris", "Paris, France"], ["the cat sat on the red mat"]]
    got = overlap_metrics(preds, refs)
    expected_bleu = sacrebleu.corpus_bleu(preds, [[r[0] for r in refs], [r[-1] for r in refs]]).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected_rouge = sum(max(scorer.score(r, p)["rougeL"].fmeasure for r in rs) for p, rs in zip(preds, refs)) / 3
    assert abs(got["bleu4"] - expected_bleu) < 1e-9 and 0 < got["bleu4"] < 100
    assert abs(got["rouge_l"] - expected_rouge) < 1e-9
    same = overlap_metrics(["four same words here"], [["four same words here"]])
    assert abs(same["bleu4"] - 100) < 1e-9 and same["rouge_l"] == 1.0
    assert overlap_metrics(["three words here"], [["three words here"]])["bleu4"] == 0.0   # no 4-grams: BLEU-4 is 0
    m = shown_rank_metrics([["a", "b", "c"], ["x", "g"], ["y", "z"]], [["a"], ["g", "h"], ["q"]], 3)
    assert m == {"hit@1": 1 / 3, "hit@3": 2 / 3, "mrr": (1 + 0.5) / 3}
    assert error_class("Paris", True, [], ["d"]) is None
    assert error_class("  ", False, ["d"], ["d"]) == "no answer"
    assert error_class("Rome", False, ["x"], ["d"]) == "retrieval miss"
    assert error_class("Rome", False, ["x", "d"], ["d"]) == "not in the shown documents"
    # a reading miss by where the wrong answer was copied from
    docs = [{"id": "d", "title": "France", "text": "Capital: Paris\nLargest port: Marseille"},
            {"id": "x", "title": "Italy", "text": "Capital: Rome"}]
    assert documents_containing("Marseille", docs) == ["d"] and documents_containing("the Rome.", docs) == ["x"]
    assert documents_containing("Mars", docs) == [] and documents_containing("", docs) == []
    assert error_class("Marseille", False, ["d", "x"], ["d"], documents_containing("Marseille", docs)) == "other part of a gold document"
    assert error_class("Rome", False, ["d", "x"], ["d"], documents_containing("Rome", docs)) == "from another document"
