"""SFT, RL and eval on a tiny model: packing, the RL loss's masking, 2-process SFT, 2 RL steps,
chat_eval's EM against a hand-computed value, and one-line errors."""
import json
import os

import pytest
import torch

from tests.conftest import run_module
from tasks.sft_data import packed_batches
from nanochat.rollout import rl_batch, policy_gradient_loss, rollout
from nanochat.retrieval import Document, make_retriever
from tests.test_engine import scripted_engine, run_scripted, tiny_model


def check(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def one_line_error(proc, *needles):
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-2000:]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


class ListTask:
    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


def test_packing_keeps_conversations_whole(tokenizer):
    convs = [{"messages": [{"role": "user", "content": "the cat " * n}, {"role": "assistant", "content": "sat " * n}]}
             for n in (1, 3, 5, 2, 8, 4)]
    x, y, seq, source = next(packed_batches(ListTask(convs), tokenizer, 4, 48))
    assert set(source.view(-1).tolist()) <= {0, -1}   # a plain task is source 0; -1 is padding
    bos = tokenizer.get_bos_token_id()
    for row_x, row_y, row_seq in zip(x.tolist(), y.tolist(), seq.tolist()):
        assert row_x[0] == bos   # every row starts at a conversation
        # each conversation (a run of one seq id) starts with BOS, and targets are -1 where the mask is 0
        starts = [t for t in range(len(row_seq)) if t == 0 or row_seq[t] != row_seq[t - 1]]
        assert all(row_x[t] == bos for t in starts)
    supervised = tokenizer.decode([t for t in y.view(-1).tolist() if t >= 0])
    assert "the cat" not in supervised and "sat" in supervised


def test_compiled_sft_step_matches_eager(tokenizer):
    """chat_sft --compile (compiled trunk, eager sparse head) gives the eager loss, hits and gradients on
    a packed batch, documents kept apart by seq_idx (one T block with a short conv: an M block would
    add ~25 s of compiling; test_engine compiles one)."""
    convs = [{"messages": [{"role": "user", "content": "the cat " * n}, {"role": "assistant", "content": "sat " * n}]}
             for n in (1, 3, 5, 2, 8, 4)]
    x, y, seq_idx, _ = next(packed_batches(ListTask(convs), tokenizer, 2, 48))
    model = tiny_model(tokenizer.get_vocab_size(), "T/conv4").train()
    loss, hits = model(x, y, seq_idx=seq_idx, with_hits=True)
    loss.backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled_loss, compiled_hits = model.supervised_loss(torch.compile(model.trunk, dynamic=False)(x, seq_idx=seq_idx), y)
    compiled_loss.backward()
    assert torch.allclose(loss, compiled_loss, atol=1e-5)
    assert torch.equal(hits, compiled_hits)
    for g, p in zip(eager, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-4)


def test_rl_loss_ignores_injected_tokens(tokenizer):
    S = tokenizer.special
    retriever = make_retriever("simple", [Document("d1", "King", "The old king was born in the river city."),
                                          Document("d2", "Cat", "The cat sat on the mat.")])
    script = ([S["<|search_start|>"]] + tokenizer.encode("king") + [S["<|search_end|>"]]
              + tokenizer.encode("the city") + [S["<|assistant_end|>"]])
    model, engine = scripted_engine(tokenizer, script, retriever)
    prompt = tokenizer.encode("q", prepend="<|bos|>")
    rows = run_scripted(model, engine, prompt, num_samples=2, max_tokens=30, temperature=0.0, keep_stop=True)
    samples = [{"row": r} for r in rows]
    x, y = rl_batch(samples, S["<|assistant_end|>"], "cpu")
    logits = torch.randn(x.shape[0], x.shape[1], tokenizer.get_vocab_size(), requires_grad=True)
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none")
    loss = policy_gradient_loss(nll.view(y.shape), y, torch.tensor([1.0, -0.5]))
    loss.backward()
    row = rows[0]
    for t in range(len(row.tokens) - 1):
        # logits at position t predict token t+1: zero gradient unless the policy sampled token t+1
        grad_norm = logits.grad[0, t].abs().sum().item()
        if row.mask[t + 1] == 0:
            assert grad_norm == 0.0, t
        else:
            assert grad_norm > 0.0, t
    n_injected = row.mask.count(0) - len(prompt)
    assert n_injected > 5   # the documents really were there


@pytest.fixture(scope="module")
def kb_and_qa(tmp_path_factory):
    d = tmp_path_factory.mktemp("kbqa")
    docs = [{"id": f"d{i}", "title": t, "text": txt} for i, (t, txt) in enumerate([
        ("Cat", "The cat sat on the red mat."), ("King", "The old king was born in the river city."),
        ("Dog", "The dog ran under the blue house."), ("Queen", "The queen wrote in the green city.")])]
    with open(d / "docs.jsonl", "w") as f:
        for doc in docs:
            f.write(json.dumps(doc) + "\n")
    check(run_module("kb_tools.build_kb", "--input", str(d / "docs.jsonl"), "--out", str(d / "kb"),
                     "--retrievers", "simple,bm25", base_dir=d))
    return d


def test_chat_eval_em_matches_hand_count(trained_base, kb_and_qa, tmp_path, monkeypatch):
    """Find what the model answers (greedy, same prompt as chat_eval), then write gold answers
    so that exactly 3 of 5 questions are right: chat_eval must report EM 0.6."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(trained_base))
    from nanochat.checkpoint_manager import load_model
    from nanochat.retrieval import RetrievalManager
    from tasks.rag import RAGTask
    from nanochat.rag import normalize_answer
    model, tokenizer, _ = load_model("base", "cpu", model_tag="tiny")
    questions = ["Where was the king born?", "What did the cat sit on?", "Who wrote?", "Where did the dog run?", "Who sat?"]
    kb = RetrievalManager(str(kb_and_qa / "kb"), retriever="bm25")
    rows = [{"question": q, "answers": ["placeholder"]} for q in questions]
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from tasks.jsonl_qa import JsonlQA
    task = RAGTask(JsonlQA(str(qa)), kb, 3)
    predictions = []
    for i in range(5):
        _, (s,) = rollout(model, tokenizer, task, task[i], max_tokens=12)
        predictions.append(s["answer"])
    assert all(normalize_answer(p) for p in predictions), predictions
    for i, r in enumerate(rows):
        r["answers"] = [predictions[i]] if i < 3 else ["definitely not this"]
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out_json = tmp_path / "metrics.json"
    check(run_module("scripts.chat_eval", "--source", "base", "--model-tag", "tiny", "--qa", str(qa), "--kb",
                     str(kb_and_qa / "kb"), "--max-new-tokens", "12", "--json-out", str(out_json), base_dir=trained_base))
    metrics = json.loads(out_json.read_text())["metrics"]
    assert metrics["em"] == pytest.approx(0.6)
    assert metrics["n"] == 5


def test_chat_eval_on_a_task_loads_no_compiler_and_no_nltk(trained_base):
    """The fixed cost of an evaluation: loading a model builds it on the meta device without the
    meta-tensor init that imports torch._dynamo / torch.fx's sympy, and a task's short answers get
    no BLEU/ROUGE (rouge-score imports all of NLTK and scipy.stats): together over a second and ~140 MiB a run."""
    import subprocess
    import sys
    code = ("import runpy, sys; sys.argv = ['chat_eval', '--source', 'base', '--model-tag', 'tiny', '--task', 'world1', "
            "'--num-examples', '2', '--max-new-tokens', '1']; runpy.run_module('scripts.chat_eval', run_name='__main__'); "
            "print('heavy:', [m for m in ('torch._dynamo', 'sympy', 'nltk', 'scipy.stats') if m in sys.modules])")
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(trained_base), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(__file__)), env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "world1 (retrieval): EM" in p.stdout and "heavy: []" in p.stdout, p.stdout[-2000:]


def test_sft_torchrun_two_processes_then_rl_two_steps(trained_base, monkeypatch):
    sft = check(run_module("scripts.chat_sft", "--model-tag", "tiny", "--num-iterations", "3", "--device-batch-size", "2",
                           "--eval-every", "0", "--eval-examples", "2", "--curriculum", "world1,world3",
                           "--query-position", "both", "--max-stage-steps", "2", "--no-compile",
                           base_dir=trained_base, torchrun_procs=2))
    assert "step     3/3" in sft
    ckpt = os.path.join(trained_base, "chatsft_checkpoints", "tiny")
    records = [json.loads(l) for l in open(os.path.join(ckpt, "metrics.jsonl"))]
    assert records[-1]["step"] == 3 and "world3/em" in records[-1]
    # a 20-step base is far from the 0.9 gate: the step budget moved it on, on both ranks alike
    assert "moving on at step 2 (--max-stage-steps)" in sft and [r["stage"] for r in records if "stage" in r] == [0, 0, 1]
    torch.load(os.path.join(ckpt, "model_000003.pt"), weights_only=True)
    rl = check(run_module("scripts.chat_rl", "--model-tag", "tiny", "--num-iterations", "2", "--prompts-per-step", "2",
                          "--num-samples", "3", "--max-new-tokens", "8", "--eval-every", "0", "--eval-examples", "2",
                          "--no-keep-best", base_dir=trained_base))
    for key in ("reward", "EM", "searches/q", "valid searches", "gold recall", "len"):
        assert key in rl
    assert os.path.exists(os.path.join(trained_base, "chatrl_checkpoints", "tiny", "model_000002.pt"))
    # the reading order travels with the model: RL kept it, and every loader (chat_eval, chat_cli, chat_web,
    # the RL rollouts) renders with the tokenizer load_model hands back
    from nanochat.checkpoint_manager import load_model
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(trained_base))
    for source in ("sft", "rl"):
        _, tok, meta = load_model(source, "cpu", model_tag="tiny")
        assert meta["query_position"] == "both" and tok.query_position == "both"
    _, tok, _ = load_model("base", "cpu", model_tag="tiny")
    assert tok.query_position == "after"   # checkpoints from before the option read as they always did


def test_bad_input(trained_base, kb_and_qa, tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "Where?", "answers": ["x"]}) + "\n")
    p = run_module("scripts.chat_eval", "--source", "base", "--model-tag", "tiny", "--qa", str(qa), "--kb",
                   str(tmp_path / "no_kb"), base_dir=trained_base)
    one_line_error(p, "no_kb")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    p = run_module("scripts.chat_eval", "--source", "base", "--model-tag", "tiny", "--qa", str(empty), "--kb",
                   str(kb_and_qa / "kb"), base_dir=trained_base)
    one_line_error(p, "no questions")
    p = run_module("scripts.chat_sft", "--model-tag", "tiny", "--block-pattern", "MMTT", base_dir=trained_base)
    one_line_error(p, "block pattern")
    p = run_module("scripts.chat_eval", "--source", "base", "--model-tag", "tiny", "--qa", str(qa), "--kb",
                   str(kb_and_qa / "kb"), "--retriever", "dense", base_dir=trained_base)
    one_line_error(p, "dense")
    p = run_module("scripts.chat_sft", "--model-tag", "tiny", "--curriculum", "world9", base_dir=trained_base)
    one_line_error(p, "world9")


def test_batch_exact_match_counts_whole_conversations():
    from tasks.sft_data import conversation_exact_match
    # row 0: conversation 0 all right, conversation 1 one wrong token; row 1: conversation 0 has no
    # supervised tokens (not counted), conversation 1 right
    targets = torch.tensor([[1, 2, -1, 3, 4], [-1, -1, -1, 2, -1]])
    seq_idx = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 1, 1]])
    predicted = torch.tensor([[1, 2, 0, 3, 0], [0, 0, 0, 2, 0]])
    assert conversation_exact_match(predicted == targets, targets, seq_idx) == (2, 3)


def test_sft_on_your_own_documents(trained_base, tmp_path):
    """chat_sft --kb --qa with no other flag: qa and reading drills mixed, a held-out split by
    document, early stopping, a checkpoint of its own, and held-out EM with and without retrieval."""
    import sysconfig
    colors = ["red", "blue", "green", "old", "new"]
    docs = [{"id": f"d{i}", "title": f"city {i}", "text": f"name: city {i}\ncolor: {colors[i % 5]}\nking: king {i}"} for i in range(30)]
    rows = [{"question": f"What is the {field} of city {i}?", "answers": [answer], "supporting_ids": [f"d{i}"]}
            for i in range(30) for field, answer in (("color", colors[i % 5]), ("king", f"king {i}"))]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    check(run_module("kb_tools.build_kb", "--input", str(tmp_path / "docs.jsonl"), "--out", str(tmp_path / "mine"),
                     "--retrievers", "bm25", base_dir=tmp_path))
    # reading drills take their words from real text: a small stdlib package keeps the scan short
    email = os.path.join(sysconfig.get_paths()["stdlib"], "email")
    out = check(run_module("scripts.chat_sft", "--source", "base", "--model-tag", "tiny", "--kb", str(tmp_path / "mine"),
                           "--qa", str(tmp_path / "qa.jsonl"), "--num-iterations", "6", "--eval-every", "2",
                           "--eval-examples", "4", "--device-batch-size", "2", "--patience", "1", "--no-compile",
                           base_dir=trained_base, extra_env={"NANOCHAT_REALTEXT_ROOTS": email}))
    assert "qa:50%+read1:25%+read3:25%" in out and "held-out eval: qa" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("own documents: held-out EM") and "with retrieval" in last and "without" in last, last
    ckpt = os.path.join(trained_base, "chatsft_checkpoints", "tiny_mine")
    heldout = [json.loads(l) for l in open(os.path.join(ckpt, "heldout_qa.jsonl"))]
    heldout_docs = {d for r in heldout for d in r["supporting_ids"]}
    train_docs = {r["supporting_ids"][0] for r in rows if r["question"] not in {h["question"] for h in heldout}}
    assert heldout and train_docs and not heldout_docs & train_docs
    meta = json.loads(open(sorted(f for f in (os.path.join(ckpt, n) for n in os.listdir(ckpt)) if "meta_" in f)[-1]).read())
    assert meta["user_config"]["curriculum"] == "qa:0.5+read1:0.25+read3:0.25" and meta["step"] in (0, 2, 4, 6)


def test_rl_micro_batches_by_length_give_the_full_batch_gradient(tokenizer):
    """chat_rl's policy-gradient step in length-sorted micro-batches (global token count as the
    denominator) has the gradient of the whole batch at once."""
    from nanochat.engine import RowState
    from nanochat.rollout import length_buckets
    model = tiny_model(tokenizer.get_vocab_size())
    g = torch.Generator().manual_seed(0)
    samples = []
    for n_prompt, n_sampled in [(5, 3), (9, 7), (4, 2), (12, 1), (6, 5)]:
        ids = torch.randint(0, 300, (n_prompt + n_sampled,), generator=g).tolist()
        samples.append({"row": RowState(tokens=ids, mask=[0] * n_prompt + [1] * n_sampled)})
    advantages = [1.0, -0.5, 0.25, 2.0, -1.0]

    def gradient(buckets):
        model.zero_grad()
        num_tokens = sum(sum(s["row"].mask[1:]) for s in samples)
        for bucket in buckets:
            x, y = rl_batch([samples[i] for i in bucket], 0, "cpu")
            nll = model(x, y, loss_reduction="none").view(y.shape)
            policy_gradient_loss(nll, y, torch.tensor([advantages[i] for i in bucket]), num_tokens).backward()
        return [p.grad.clone() for p in model.parameters()]

    whole = gradient([list(range(len(samples)))])
    buckets = length_buckets(samples, 2)
    assert [len(samples[i]["row"].tokens) for b in buckets for i in b] == sorted(len(s["row"].tokens) for s in samples)
    for a, b in zip(whole, gradient(buckets)):
        assert torch.allclose(a, b, atol=1e-6)


def test_latest_model_tag_skips_directories_without_a_model(tmp_path, monkeypatch):
    """A run killed before its first save leaves an empty tag directory; the default model is still
    the latest one that has a model file."""
    from nanochat.checkpoint_manager import find_model_tag
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    good = tmp_path / "chatsft_checkpoints" / "d4"
    good.mkdir(parents=True)
    (good / "model_000100.pt").write_bytes(b"")
    (tmp_path / "chatsft_checkpoints" / "d4_killed").mkdir()
    os.utime(good, (1, 1))   # older than the empty directory
    assert find_model_tag("sft") == "d4"
    (tmp_path / "chatsft_checkpoints" / "d4").joinpath("model_000100.pt").unlink()
    with pytest.raises(FileNotFoundError):
        find_model_tag("sft")
