"""
Retrieval-augmented pretraining (base_train --retrieval-augment): the neighbours never come from
the sequence's own document, only the sequence's tokens are scored, units never leak into each
other, and the CLI end to end on a knowledge-world quiz corpus.
"""
import json

import pytest
import torch

from nanochat.dataloader import NeighbourLoader
from nanochat.retrieval import RetrievalManager
from nanochat.retrieval.kb import build_kb
from tasks.knowledge_world import make_world, quiz_corpus
from tests.conftest import run_module, TINY_MODEL


class ListSource:
    def __init__(self, texts):
        self.texts = texts

    def get(self, i):
        return self.texts[i % len(self.texts)]


@pytest.fixture(scope="module")
def world_kb(tmp_path_factory):
    d = tmp_path_factory.mktemp("realm")
    world = make_world(5, "train", people=12, cities=4, orgs=5, works=5, countries=2)
    world.write_kb_input(d / "docs.jsonl")
    build_kb([str(d / "docs.jsonl")], str(d / "kb"), retrievers=["bm25"], show_progress=False, log=lambda *a: None)
    return world, d


def units_of(loader, n):
    return loader.next_units(n)


def test_neighbours_never_come_from_the_sequence_itself(tokenizer, world_kb):
    world, d = world_kb
    kb = RetrievalManager(str(d / "kb"), retriever="bm25")
    parent = {doc.id: doc.text for doc in kb.documents}
    docs = world.documents()
    # the training text IS the KB's documents (title line + text, as a user's shards would hold them)
    source = ListSource([f"{doc['title']}\n{doc['text']}" for doc in docs])
    loader = NeighbourLoader(source, tokenizer, kb, parent, 3, 2, 128, docs_per_fetch=len(docs))
    units = loader.next_units(len(docs))
    own_first = with_neighbours = 0
    for unit in units:
        doc = docs[unit[0] % len(docs)]
        assert all(n.doc_id != doc["id"] for n in unit[4]), (doc["id"], [n.doc_id for n in unit[4]])
        assert len(unit[4]) <= 3   # up to k: BM25 returns only chunks sharing a word with the query
        with_neighbours += bool(unit[4])
        own_first += kb.search_batch([unit[1]], 1)[0][0].document.doc_id == doc["id"]
    assert with_neighbours >= len(units) // 4   # cities, founders and authors are named in other articles
    assert own_first >= len(units) // 2   # without the rule the document itself would usually come first


def test_realm_loss_reads_each_neighbour_alone_never_its_own_document(tokenizer, world_kb, tmp_path):
    from nanochat.retrieval.dense import resolve_model, DEFAULT_MODEL
    from nanochat.retrieval.query_encoder import load_encoder
    from nanochat.retriever_training import realm_loss
    from tests.test_engine import tiny_model
    world, d = world_kb
    build_kb([str(d / "docs.jsonl")], str(tmp_path / "dense"), retrievers=["dense"], show_progress=False, log=lambda *a: None)
    kb = RetrievalManager(str(tmp_path / "dense"), retriever="dense", query_encoder="base")
    parent = {doc.id: doc.text for doc in kb.documents}
    docs = world.documents()
    source = ListSource([f"{doc['title']}\n{doc['text']}" for doc in docs])
    loader = NeighbourLoader(source, tokenizer, kb, parent, 0, 2, 128, docs_per_fetch=8)
    units = loader.next_units(6)
    encoder = load_encoder(resolve_model(DEFAULT_MODEL)[0])
    emb = torch.from_numpy(kb.retriever.embeddings.copy())
    model = tiny_model(tokenizer.get_vocab_size(), "TM", seed=4)
    loss, stats = realm_loss(model, encoder, emb, kb.chunks, parent, loader, units, 3, 0.1, "cpu")
    for unit, picked in zip(units, stats["chunks"]):
        assert len(picked) == 3 and all(kb.chunks[c].doc_id != docs[unit[0]]["id"] for c in picked)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())
    # the loss is the marginal NLL of the rows read one by one
    with torch.no_grad():
        q = encoder.encode([u[1] for u in units], convert_to_tensor=True, normalize_embeddings=True)
        prior = torch.log_softmax(torch.stack([(q[i] @ emb[c].T) for i, c in enumerate(stats["chunks"])]) / 0.1, dim=1)
        total, count = 0.0, 0
        for i, unit in enumerate(units):
            per_doc = []
            for c in stats["chunks"][i]:
                ids, scored = loader.render(unit, [kb.chunks[c]])
                logits = model(torch.tensor([ids[:-1]]))[0].log_softmax(-1)
                per_doc.append(sum(logits[t, ids[t + 1]] for t in range(len(ids) - 1) if scored[t + 1]))
            total -= torch.logsumexp(prior[i] + torch.stack(per_doc), 0)
            count += len(unit[3])
    assert abs(loss.item() - total.item() / count) < 1e-3


def test_only_the_sequence_is_scored_and_units_stay_apart(tokenizer, world_kb):
    world, d = world_kb
    kb = RetrievalManager(str(d / "kb"), retriever="bm25")
    parent = {doc.id: doc.text for doc in kb.documents}
    train, _ = quiz_corpus(world, seed=1, heldout_frac=0.0)
    source = ListSource(train)
    loader = NeighbourLoader(source, tokenizer, kb, parent, 2, 3, 128, query_tokens=12)
    probe = NeighbourLoader(source, tokenizer, kb, parent, 2, 3, 128, query_tokens=12)
    x, y, seq_idx = loader.next_batch()
    assert x.shape == y.shape == seq_idx.shape == (3, 128)
    doc_start = tokenizer.encode_special("<|doc_start|>")
    units = probe.next_units(64)
    u = shown = 0
    for row in range(3):
        for s in range(int(seq_idx[row].max()) + 1):
            at = (seq_idx[row] == s).nonzero().flatten()
            targets = y[row, at].tolist()
            scored = [t for t in targets if t >= 0]
            if not scored:
                continue   # padding
            _, query, context, seq, found = units[u]
            u += 1
            ids = x[row, at].tolist()
            assert ids[0] == tokenizer.get_bos_token_id()
            assert scored == seq   # the sequence, nothing else
            assert targets[-len(seq):] == seq or targets[-len(seq) - 1:-1] == seq
            if found:   # neighbours come first
                assert doc_start in ids and ids.index(doc_start) < len(ids) - len(seq)
                shown += 1
            assert tokenizer.decode(context[1:]) == query and query.strip()   # the text just before the sequence
    assert u >= 3 and shown >= 1
    # seq_idx: attention never crosses units (the GPT masks by it)
    alone = NeighbourLoader(source, tokenizer, kb, parent, 0, 1, 128, query_tokens=12).next_batch()
    assert tokenizer.encode_special("<|doc_start|>") not in alone[0].tolist()[0]   # k = 0: the same units, no documents


def test_base_train_retrieval_augment_cli(trained_base, world_kb, tmp_path):
    import shutil
    import pyarrow as pa
    import pyarrow.parquet as pq
    world, d = world_kb
    train, heldout = quiz_corpus(world, seed=0, heldout_frac=0.3)
    data = tmp_path / "quizzes"
    data.mkdir()
    pq.write_table(pa.table({"text": train}), data / "shard_00000.parquet")
    pq.write_table(pa.table({"text": heldout}), data / "shard_00001.parquet")
    base = tmp_path / "base"
    shutil.copytree(trained_base / "tokenizer", base / "tokenizer")
    proc = run_module("scripts.base_train", *TINY_MODEL, "--data", str(data), "--num-iterations", "4", "--eval-every", "2",
                      "--retrieval-augment", "2", "--kb", str(d / "kb"), "--model-tag", "realm", base_dir=base)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out sequences:" in proc.stdout and "after 2 neighbours" in proc.stdout
    meta = json.loads(open(base / "base_checkpoints" / "realm" / "meta_000004.json").read())
    assert meta["neighbour_bpb"]["k"] == 2 and meta["neighbour_bpb"]["with_neighbours"] > 0
    # REALM: the marginal likelihood over 2 neighbours found by a query encoder that trains too
    dense_kb = tmp_path / "dense_kb"
    build_kb([str(d / "docs.jsonl")], str(dense_kb), retrievers=["dense"], show_progress=False, log=lambda *a: None)
    emb = open(dense_kb / "dense" / "embeddings.npy", "rb").read()
    proc = run_module("scripts.base_train", *TINY_MODEL, "--data", str(data), "--num-iterations", "3", "--eval-every", "3",
                      "--retrieval-augment", "2", "--kb", str(dense_kb), "--marginalize", "--model-tag", "realm_m",
                      "--device-batch-size", "2", base_dir=base)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distinct top-1" in proc.stdout and "after 2 neighbours" in proc.stdout
    assert (base / "base_checkpoints" / "realm_m" / "query_encoder" / "model.safetensors").exists()
    assert open(dense_kb / "dense" / "embeddings.npy", "rb").read() == emb
    proc = run_module("scripts.base_train", *TINY_MODEL, "--data", str(data), "--retrieval-augment", "2", "--kb",
                      str(d / "kb"), "--marginalize", base_dir=base)
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and "--marginalize" in lines[0] and "dense" in lines[0], proc.stderr
    proc = run_module("scripts.base_train", *TINY_MODEL, "--data", str(data), "--retrieval-augment", "2", base_dir=base)
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and "--retrieval-augment needs --kb" in lines[0], proc.stderr


def test_kb_from_parquet_shards(tmp_path, world_kb):
    """Online users build the neighbours' KB from their pretraining shards: one document per row."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    world, _ = world_kb
    texts = [doc["text"] for doc in world.documents()]
    pq.write_table(pa.table({"text": texts}), tmp_path / "shard_00000.parquet")
    build_kb([str(tmp_path)], str(tmp_path / "kb"), retrievers=["bm25"], show_progress=False, log=lambda *a: None)
    kb = RetrievalManager(str(tmp_path / "kb"), retriever="bm25")
    assert len(kb.documents) == len(texts) and kb.documents[0].id == "shard_00000.parquet:1"
    assert kb.search(texts[3], 1)[0].document.text == texts[3]
    pq.write_table(pa.table({"body": texts}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="bad.parquet: no 'text' column"):
        build_kb([str(tmp_path / "bad.parquet")], str(tmp_path / "kb2"), show_progress=False, log=lambda *a: None)
