"""
RAG's marginal likelihood (chat_sft --marginalize): the losses against brute force computed one
document at a time, the K = 1 special cases, where gradients go, and the CLI for T, M and hybrid
patterns (and two gloo processes).
"""
import os
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanochat.retriever_training import answer_conversation, answer_token_logprobs, marginal_nll, rag_loss
from nanochat.retrieval import Document
from tests.conftest import run_module
from tests.test_engine import tiny_model

DOCS = [{"id": "a", "title": "Kelto", "text": "Kelto was founded by Ravi in 1843."},
        {"id": "b", "title": "Mora", "text": "Mora is a city known for salt and a much longer text about it."},
        {"id": "c", "title": "", "text": "short"}]
QUESTIONS = [("Who founded Kelto?", "Ravi"), ("What is Mora known for?", "salt and wine")]


def one_by_one(model, tokenizer, question, answer, doc):
    """log p of each answer token with this document alone: a forward of the single conversation."""
    ids, mask = tokenizer.render_conversation(answer_conversation(question, answer, doc), max_tokens=128)
    logp = F.log_softmax(model(torch.tensor([ids[:-1]]))[0].float(), -1)
    return torch.stack([logp[t, ids[t + 1]] for t in range(len(ids) - 1) if mask[t + 1] == 1])


@pytest.mark.parametrize("pattern", ["TT/conv3", "MM", "TM"])
def test_marginal_nll_equals_brute_force_logsumexp(tokenizer, pattern):
    model = tiny_model(tokenizer.get_vocab_size(), pattern, seed=1)
    items = [(q, a, d) for q, a in QUESTIONS for d in DOCS]
    logp, mask, _ = answer_token_logprobs(model, tokenizer, items, "cpu", max_tokens=128)
    B, K = len(QUESTIONS), len(DOCS)
    logp, mask = logp.view(B, K, -1), mask.view(B, K, -1)[:, 0]
    prior = torch.log_softmax(torch.randn(B, K), dim=1)
    seq, tok = marginal_nll(logp, mask, prior, "sequence"), marginal_nll(logp, mask, prior, "token")
    for b, (q, a) in enumerate(QUESTIONS):
        per_doc = [one_by_one(model, tokenizer, q, a, d) for d in DOCS]        # K tensors (n,)
        assert len(per_doc[0]) == int(mask[b].sum()) >= 2                      # the answer and the end of the turn
        brute_seq = -torch.logsumexp(torch.stack([prior[b, k] + per_doc[k].sum() for k in range(K)]), 0)
        brute_tok = -sum(torch.logsumexp(torch.stack([prior[b, k] + per_doc[k][i] for k in range(K)]), 0)
                         for i in range(len(per_doc[0])))
        assert abs(seq[b].item() - brute_seq.item()) < 1e-4
        assert abs(tok[b].item() - brute_tok.item()) < 1e-4


def test_one_document_token_equals_sequence_equals_plain_sft(tokenizer):
    model = tiny_model(tokenizer.get_vocab_size(), "TM", seed=2)
    q, a = QUESTIONS[0]
    logp, mask, _ = answer_token_logprobs(model, tokenizer, [(q, a, DOCS[0])], "cpu", max_tokens=128)
    logp, mask, prior = logp.view(1, 1, -1), mask, torch.zeros(1, 1)
    seq, tok = marginal_nll(logp, mask, prior, "sequence"), marginal_nll(logp, mask, prior, "token")
    ids, m = tokenizer.render_conversation(answer_conversation(q, a, DOCS[0]), max_tokens=128)
    x = torch.tensor([ids[:-1]])
    y = torch.tensor([[t if keep else -1 for t, keep in zip(ids[1:], m[1:])]])
    sft_mean = model(x, y)                                                     # the SFT loss: mean over the answer's tokens
    n = int((y >= 0).sum())
    assert abs(seq.item() - tok.item()) < 1e-5
    assert abs(seq.item() / n - sft_mean.item()) < 1e-5


@pytest.fixture(scope="module")
def encoder_and_chunks():
    from nanochat.retrieval.dense import resolve_model, DEFAULT_MODEL, encode
    from nanochat.retrieval.query_encoder import load_encoder
    encoder = load_encoder(resolve_model(DEFAULT_MODEL)[0])
    chunks = [Document(d["id"], d["title"], d["text"]) for d in DOCS]
    emb = torch.from_numpy(np.asarray(encode(encoder, [f"{c.title}\n{c.text}" for c in chunks], 8), dtype=np.float32))
    return encoder, chunks, emb


@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_rag_loss_trains_generator_and_query_encoder_never_documents(tokenizer, encoder_and_chunks, mode):
    encoder, chunks, emb = encoder_and_chunks
    doc_emb = emb.clone()
    model = tiny_model(tokenizer.get_vocab_size(), "TM", seed=3).train()
    encoder.train()
    encoder.zero_grad(set_to_none=True)
    questions, answers = [q for q, _ in QUESTIONS], [a for _, a in QUESTIONS]
    loss, stats = rag_loss(model, tokenizer, encoder, doc_emb, chunks, questions, answers, 2, 0.1, mode, "cpu", 128)
    loss.backward()
    assert torch.isfinite(loss) and 0 <= stats["entropy"] <= np.log(2) + 1e-6 and len(stats["top1"]) == 2
    enc_grad = sum(p.grad.abs().sum().item() for p in encoder.parameters() if p.grad is not None)
    gen_grad = sum(p.grad.abs().sum().item() for p in model.parameters() if p.grad is not None)
    assert enc_grad > 0 and gen_grad > 0
    assert doc_emb.grad is None and torch.equal(doc_emb, emb)                 # the stored embeddings are constants

    # K = 1: the loss is the plain SFT loss on the conversation with the top document
    model.zero_grad(set_to_none=True)
    loss1, stats1 = rag_loss(model, tokenizer, encoder, doc_emb, chunks, questions[:1], answers[:1], 1, 0.1, mode, "cpu", 128)
    ids, m = tokenizer.render_conversation(answer_conversation(questions[0], answers[0], chunks[stats1["top1"][0]].to_dict()),
                                           max_tokens=128)
    y = torch.tensor([[t if keep else -1 for t, keep in zip(ids[1:], m[1:])]])
    assert abs(loss1.item() - model(torch.tensor([ids[:-1]]), y).item()) < 1e-5


# -----------------------------------------------------------------------------
# chat_sft --marginalize end to end

@pytest.fixture(scope="module")
def rag_world(tmp_path_factory):
    """A small knowledge world as a KB with a dense index, descriptive questions about it, and a
    bm25-only KB of the same documents."""
    from nanochat.retrieval.kb import build_kb
    from tasks.knowledge_world import make_world
    d = tmp_path_factory.mktemp("ragworld")
    world = make_world(3, "heldout", people=8, cities=3, orgs=4, works=4, countries=2)
    world.write_kb_input(d / "docs.jsonl")
    world.write_qa(d / "qa.jsonl", 40, descriptive=True)
    build_kb([str(d / "docs.jsonl")], str(d / "kb"), show_progress=False, log=lambda *a: None)
    build_kb([str(d / "docs.jsonl")], str(d / "lexical"), retrievers=["bm25"], show_progress=False, log=lambda *a: None)
    return d


def test_chat_sft_marginalize_for_t_m_hybrid_and_two_processes(trained_base, parquet_dir, rag_world, tmp_path):
    import shutil
    from tests.conftest import TINY_MODEL
    base = tmp_path / "base"
    shutil.copytree(trained_base / "tokenizer", base / "tokenizer")
    shutil.copytree(trained_base / "base_checkpoints" / "tiny", base / "base_checkpoints" / "tiny")
    for pattern in ("MM", "TM"):
        proc = run_module("scripts.base_train", *TINY_MODEL, "--data", parquet_dir, "--num-iterations", "2",
                          "--block-pattern", pattern, "--model-tag", f"tiny_{pattern}", base_dir=base)
        assert proc.returncode == 0, proc.stderr[-3000:]
    for tag, mode, procs in (("tiny", "sequence", 2), ("tiny_MM", "token", 0), ("tiny_TM", "sequence", 0)):
        kb = shutil.copytree(rag_world / "kb", tmp_path / f"kb_{tag}")
        emb = open(os.path.join(kb, "dense", "embeddings.npy"), "rb").read()
        proc = run_module("scripts.chat_sft", "--source", "base", "--model-tag", tag, "--kb", kb, "--qa",
                          str(rag_world / "qa.jsonl"), "--marginalize", mode, "--marginal-k", "3", "--num-iterations", "2",
                          "--device-batch-size", "2", "--eval-every", "1", "--eval-examples", "4", "--patience", "0",
                          "--encoder-to-kb", base_dir=base, torchrun_procs=procs)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = proc.stdout
        assert f"RAG-{mode.capitalize()}" in out and "held-out retrieval R@1" in out and "distinct top-1" in out
        assert out.strip().splitlines()[-1].startswith("own documents: held-out EM")
        ckpt = base / "chatsft_checkpoints" / f"{tag}_kb_{tag}"
        assert (ckpt / "query_encoder" / "model.safetensors").exists()
        meta = json.loads(open(sorted(ckpt.glob("meta_*.json"))[-1]).read())
        assert meta["rag"]["marginalize"] == mode and meta["model_config"]["block_pattern"] == (tag[5:] or "TT")
        manifest = json.loads(open(os.path.join(kb, "manifest.json")).read())
        assert manifest["query_encoder"]["objective"] == f"rag-{mode}"
        assert open(os.path.join(kb, "dense", "embeddings.npy"), "rb").read() == emb   # documents never trained


def test_chat_sft_marginalize_bad_input(trained_base, rag_world):
    def fails(*args, needle):
        proc = run_module("scripts.chat_sft", "--source", "base", "--model-tag", "tiny", *args, base_dir=trained_base)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
    qa = str(rag_world / "qa.jsonl")
    fails("--kb", str(rag_world / "lexical"), "--qa", qa, "--marginalize", "sequence", needle="--marginalize needs a KB with a dense index")
    fails("--kb", str(rag_world / "kb"), "--qa", qa, "--marginalize", "token", "--marginal-k", "1000", needle="--marginal-k 1000 is more than")
    fails("--marginalize", "sequence", needle="--marginalize needs --qa")
    fails("--kb", str(rag_world / "kb"), "--qa", qa, "--marginalize", "sequence", "--curriculum", "qa", needle="drop --curriculum")
