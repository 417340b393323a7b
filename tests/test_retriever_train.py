"""
Retriever training: the losses, the teacher's scores, the encoder saved into a KB, the CLI.
The KB tests use the offline MiniLM (a few seconds to load and encode a dozen documents).
"""
import os
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanochat.gpt import GPT
from nanochat.retriever_training import contrastive_loss, lsr_loss, answer_scores, answer_conversation
from tests.conftest import run_module
from tests.test_engine import tiny_config, perturb
from tasks.knowledge_world import make_world


def test_lsr_loss_moves_p_toward_q():
    torch.manual_seed(0)
    lm = torch.tensor([[-0.2, -3.0, -1.0, -4.0], [-2.0, -2.5, -0.1, -3.0]])   # teacher prefers doc 0, then doc 2
    cos = torch.zeros(2, 4, requires_grad=True)
    opt = torch.optim.SGD([cos], lr=0.05)
    first = None
    for _ in range(50):
        loss = lsr_loss(cos, lm, beta=0.5, gamma=0.1)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first
    p, q = F.softmax(cos / 0.1, -1), F.softmax(lm / 0.5, -1)
    assert torch.equal(p.argmax(-1), q.argmax(-1)) and torch.allclose(p, q, atol=0.02)
    # KL is zero exactly when P == Q, and it is KL(Q || P), not the reverse
    same = lsr_loss(lm / 0.5 * 0.1, lm, beta=0.5, gamma=0.1)
    assert abs(same.item()) < 1e-6
    cos2 = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    qq = F.softmax(lm[:1] / 0.5, -1)
    pp = F.softmax(cos2 / 0.1, -1)
    assert torch.allclose(lsr_loss(cos2, lm[:1], 0.5, 0.1), (qq * (qq.log() - pp.log())).sum(), atol=1e-6)


def test_contrastive_loss_matches_hand_and_reaches_the_queries():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(3, 8), dim=-1).requires_grad_()
    c = F.normalize(torch.randn(5, 8), dim=-1)
    positive = torch.tensor([[1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    loss = contrastive_loss(q, c, positive, temperature=0.1)
    logits = q @ c.T / 0.1
    hand = []
    for i in range(3):
        e = logits[i].exp()
        hand.append(-torch.log(e[positive[i]].sum() / e.sum()))
    assert torch.allclose(loss, torch.stack(hand).mean(), atol=1e-5)
    loss.backward()
    assert q.grad.abs().sum() > 0


def test_answer_scores_equal_teacher_forced_log_likelihoods(tokenizer):
    torch.manual_seed(0)
    model = GPT(tiny_config(tokenizer.get_vocab_size(), "TM/conv3"))
    model.init_weights()
    perturb(model)
    model.eval()
    docs = [{"id": "a", "title": "Kelto", "text": "Kelto was founded by Ravi in 1843."},
            {"id": "b", "title": "Mora", "text": "Mora is a city known for salt and a much longer text about it."},
            {"id": "c", "title": "", "text": "short"}]
    items = [("Who founded Kelto?", "Ravi", docs[0]), ("Who founded Kelto?", "Ravi", docs[1]),
             ("What is Mora known for?", "salt and wine", docs[2])]
    got = answer_scores(model, tokenizer, items, "cpu", batch_size=2, max_tokens=128)   # padded, batched, reordered
    for item, score in zip(items, got):
        ids, mask = tokenizer.render_conversation(answer_conversation(*item), max_tokens=128)
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([ids[:-1]]))[0].float(), -1)
        picked = [logp[t, ids[t + 1]].item() for t in range(len(ids) - 1) if mask[t + 1] == 1]
        assert len(picked) >= 2   # the answer's tokens and the end of the turn
        assert abs(score - sum(picked) / len(picked)) < 1e-4


# -----------------------------------------------------------------------------
# KB + encoder on disk

@pytest.fixture(scope="module")
def world_kb(tmp_path_factory):
    """A small knowledge world as a KB (simple, bm25, dense) and descriptive questions about it."""
    from nanochat.retrieval.kb import build_kb
    d = tmp_path_factory.mktemp("rtrain")
    world = make_world(3, "heldout", people=8, cities=3, orgs=4, works=4, countries=2)
    world.write_kb_input(d / "docs.jsonl")
    world.write_qa(d / "qa.jsonl", 40, descriptive=True)
    build_kb([str(d / "docs.jsonl")], str(d / "kb"), show_progress=False, log=lambda *a: None)
    return d


def _copy_kb(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return str(dst)


def test_saved_encoder_serves_queries_and_leaves_documents_alone(world_kb, tmp_path, monkeypatch):
    from nanochat.retrieval import RetrievalManager
    from nanochat.retrieval.kb import load_kb, build_kb
    from nanochat.retrieval.dense import resolve_model, DEFAULT_MODEL
    from nanochat.retrieval.query_encoder import load_encoder, save_encoder
    kb = _copy_kb(world_kb / "kb", tmp_path / "kb")
    emb_path = os.path.join(kb, "dense", "embeddings.npy")
    before = open(emb_path, "rb").read()
    encoder = load_encoder(resolve_model(DEFAULT_MODEL)[0])
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = save_encoder(kb, encoder, {"objective": "contrastive"}, [{"step": 0}])
    assert open(emb_path, "rb").read() == before                       # documents untouched
    names = os.listdir(path)
    assert "model.safetensors" in names and not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    manifest = load_kb(kb).manifest                                    # checksums (encoder files included) verify
    assert manifest["query_encoder"]["objective"] == "contrastive"
    assert any(f.startswith(os.path.basename(path) + "/") for f in manifest["checksums"])

    q = "Who wrote the novel?"
    tuned = RetrievalManager(kb, retriever="dense")
    base = RetrievalManager(kb, retriever="dense", query_encoder="base")
    assert tuned.query_encoder == "tuned" and base.query_encoder == "base"
    vt, vb = tuned.retriever.encode_queries([q])[0], base.retriever.encode_queries([q])[0]
    assert not np.allclose(vt, vb, atol=1e-4)
    assert np.allclose(vt, encoder.encode([q], normalize_embeddings=True), atol=1e-5)
    hybrid = RetrievalManager(kb, retriever="hybrid")
    assert hybrid.query_encoder == "tuned"
    assert np.allclose(hybrid.retriever.dense.encode_queries([q])[0], vt, atol=1e-5)

    # adding documents keeps the encoder (new chunks are embedded by the base model, like the old ones)
    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps({"id": "new-doc", "title": "Zed", "text": "Zed is a new city known for tea."}) + "\n")
    build_kb([str(extra)], kb, add=True, show_progress=False, log=lambda *a: None)
    added = RetrievalManager(kb, retriever="dense")
    assert added.query_encoder == "tuned" and len(added.chunks) == len(tuned.chunks) + 1
    assert np.allclose(added.retriever.encode_queries([q])[0], vt, atol=1e-5)

    # two saves within one second (same stamp): the second gets its own directory, the first is replaced
    import time as time_module
    monkeypatch.setattr(time_module, "strftime", lambda fmt, *a: "20260101-000000" if "%H" in fmt and "T" not in fmt
                        else "2026-01-01T00:00:00Z")
    first = save_encoder(kb, encoder, {"objective": "contrastive"})
    second = save_encoder(kb, encoder, {"objective": "contrastive"})
    assert first != second and os.path.isdir(second) and not os.path.exists(first)
    assert RetrievalManager(kb, retriever="dense").query_encoder == "tuned"   # checksums verify

    # a save that fails midway leaves the KB (manifest, encoder) as it was, and no temp directories
    manifest_before = open(os.path.join(kb, "manifest.json")).read()
    entries_before = sorted(os.listdir(kb))

    def broken_save(path, **kwargs):
        os.makedirs(path)
        open(os.path.join(path, "model.safetensors"), "w").write("partial")
        raise OSError("disk full")
    monkeypatch.setattr(encoder, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_encoder(kb, encoder, {"objective": "lsr"})
    assert open(os.path.join(kb, "manifest.json")).read() == manifest_before
    assert sorted(os.listdir(kb)) == entries_before
    assert RetrievalManager(kb, retriever="dense").query_encoder == "tuned"


def test_retriever_train_cli(world_kb, tmp_path, trained_base):
    kb = _copy_kb(world_kb / "kb", tmp_path / "kb")
    emb = open(os.path.join(kb, "dense", "embeddings.npy"), "rb").read()
    common = ["--kb", kb, "--qa", str(world_kb / "qa.jsonl"), "--steps", "4", "--eval-every", "2", "--batch-size", "8",
              "--heldout-frac", "0.3", "--lr", "1e-4"]
    for extra in (["--objective", "contrastive"],
                  ["--objective", "lsr", "--source", "base", "--model-tag", "tiny", "--candidates", "3", "--pool", "6"]):
        proc = run_module("scripts.retriever_train", *common, *extra, base_dir=trained_base)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "step    0 | held-out R@1" in proc.stdout and "MRR@10" in proc.stdout.splitlines()[-1]
        if "lsr" in extra:
            assert "teacher scores" in proc.stdout.splitlines()[-1]
    assert open(os.path.join(kb, "dense", "embeddings.npy"), "rb").read() == emb


def test_retriever_train_bad_input(world_kb, tmp_path, trained_base, tokenizer):
    import shutil
    from nanochat.retrieval.kb import build_kb
    qa = tmp_path / "qa.jsonl"
    rows = [json.loads(line) for line in open(world_kb / "qa.jsonl")][:5]
    rows[1]["supporting_ids"] = ["no-such-doc"]
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    lexical_kb = tmp_path / "lexical"
    build_kb([str(world_kb / "docs.jsonl")], str(lexical_kb), retrievers=["bm25"], show_progress=False, log=lambda *a: None)
    kb = str(world_kb / "kb")
    cases = [(["--kb", kb, "--qa", str(qa)], f"{qa}:2: supporting id 'no-such-doc' is not a document"),
             (["--kb", kb, "--qa", str(empty)], "no questions"),
             (["--kb", str(lexical_kb), "--qa", str(world_kb / "qa.jsonl")], "retriever 'dense' was not built"),
             (["--kb", kb, "--qa", str(world_kb / "qa.jsonl"), "--objective", "emdr"], "invalid choice: 'emdr'")]
    # a run directory whose tokenizer was retrained after the checkpoint
    other_base = tmp_path / "other_base"
    shutil.copytree(trained_base, other_base)
    shutil.rmtree(other_base / "tokenizer")
    tokenizer.save(str(other_base / "tokenizer"))
    lsr = ["--kb", kb, "--qa", str(world_kb / "qa.jsonl"), "--objective", "lsr", "--source", "base", "--model-tag", "tiny"]
    proc = run_module("scripts.retriever_train", *lsr, base_dir=other_base)
    assert proc.returncode == 2 and "was trained with tokenizer" in proc.stderr, proc.stderr[-2000:]
    for args, message in cases:
        proc = run_module("scripts.retriever_train", *args, base_dir=trained_base)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr
    assert not any(n.startswith("query_encoder") for n in os.listdir(kb))
