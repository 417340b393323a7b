"""Engine: cache vs no-cache, seeds, tools (calculator and search) injected as masked blocks,
tool-only tokens never sampled, and the GPT's cache/packing mechanics."""
import torch
import pytest

from nanochat.gpt import GPT, GPTConfig, InferenceCache
from nanochat.engine import Engine, use_calculator
from nanochat.retrieval import Document, make_retriever

BANNED = ("<|doc_start|>", "<|doc_end|>", "<|output_start|>", "<|output_end|>")


def tiny_model(vocab_size, pattern="TT", seed=0, n_embd=64):
    torch.manual_seed(seed)
    cfg = GPTConfig(sequence_len=128, vocab_size=vocab_size, n_layer=len(pattern), n_head=2, n_kv_head=1,
                    n_embd=n_embd, block_pattern=pattern, mamba_d_state=16, mamba_headdim=16, mamba_chunk_size=8)
    model = GPT(cfg)
    model.init_weights()
    with torch.no_grad():   # zero-initialised projections would make every layer an identity
        for p in model.parameters():
            if p.ndim == 2:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def naive_greedy(model, tokenizer, prompt, n):
    ids = list(prompt)
    banned = [tokenizer.special[t] for t in BANNED]
    for _ in range(n):
        logits = model(torch.tensor([ids]))[0, -1]
        logits[banned] = float("-inf")
        ids.append(int(logits.argmax()))
        if ids[-1] in (tokenizer.special["<|assistant_end|>"], tokenizer.bos_token_id):
            break
    return ids


@pytest.mark.parametrize("pattern", ["TT", "M", "TM", "MT", "MMTT"])
def test_cache_equals_no_cache_greedy(tokenizer, pattern):
    model = tiny_model(tokenizer.get_vocab_size(), pattern)
    prompt = tokenizer.encode("The old king", prepend="<|bos|>")
    expected = naive_greedy(model, tokenizer, prompt, 30)
    rows = Engine(model, tokenizer).generate_batch(prompt, num_samples=3, max_tokens=30, temperature=0.0)
    if expected[-1] in (tokenizer.special["<|assistant_end|>"], tokenizer.bos_token_id):
        expected = expected[:-1]   # generate_batch leaves the stop token out
    for row in rows:
        assert row.tokens == expected


def test_seed_reproducibility_and_diversity(tokenizer):
    model = tiny_model(tokenizer.get_vocab_size())
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("The cat", prepend="<|bos|>")
    a = [r.tokens for r in engine.generate_batch(prompt, num_samples=4, max_tokens=20, temperature=1.0, seed=7)]
    b = [r.tokens for r in engine.generate_batch(prompt, num_samples=4, max_tokens=20, temperature=1.0, seed=7)]
    c = [r.tokens for r in engine.generate_batch(prompt, num_samples=4, max_tokens=20, temperature=1.0, seed=8)]
    assert a == b
    assert a != c
    assert len({tuple(t) for t in a}) > 1   # rows sample independently


class ScriptedGPT(GPT):
    """A real GPT (so the cache really advances) whose logits force a scripted completion."""
    script = []
    prompt_len = 0
    favour = None   # a token id given a huge logit at every step (to test banning)

    def forward(self, idx, targets=None, cache=None, rows=None, **kw):
        logits = super().forward(idx, targets, cache=cache, rows=rows, **kw)
        if cache is None:
            return logits
        rows_t = cache.resolve_rows(rows, idx.size(0))
        forced = torch.full_like(logits, -30.0)
        prefill = int(cache.lengths.max()) == idx.size(1)   # the prompt: nothing sampled yet
        for b, r in enumerate(rows_t.tolist()):
            # after the prompt, every forward starts with exactly one sampled token (then any injected block)
            if not prefill:
                self._sampled[r] = self._sampled.get(r, 0) + 1
            k = self._sampled.get(r, 0)
            if k < len(self.script):
                forced[b, -1, self.script[k]] = 30.0
            if self.favour is not None:
                forced[b, -1, self.favour] = 100.0
        return forced


def scripted_engine(tokenizer, script, retriever=None, favour=None, **kw):
    cfg = GPTConfig(sequence_len=256, vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    model = ScriptedGPT(cfg)
    model.init_weights()
    model.eval()
    model.script, model.favour = script, favour
    return model, Engine(model, tokenizer, retriever=retriever, **kw)


def run_scripted(model, engine, prompt, num_samples=1, **kw):
    model._sampled = {}
    return engine.generate_batch(prompt, num_samples, **kw)


def test_calculator_injection(tokenizer):
    S = tokenizer.special
    script = [S["<|python_start|>"]] + tokenizer.encode_text("2+3") + [S["<|python_end|>"]] + tokenizer.encode_text("ok") + [S["<|assistant_end|>"]]
    model, engine = scripted_engine(tokenizer, script)
    prompt = tokenizer.encode("x", prepend="<|bos|>")
    rows = run_scripted(model, engine, prompt, max_tokens=50, temperature=0.0)
    row = rows[0]
    completion, mask = row.tokens[len(prompt):], row.mask[len(prompt):]
    injected = [S["<|output_start|>"]] + tokenizer.encode_text("5") + [S["<|output_end|>"]]
    k = completion.index(S["<|output_start|>"])
    assert completion[k:k + len(injected)] == injected
    assert mask[k:k + len(injected)] == [0] * len(injected)
    assert sum(mask) == len(script) - 1   # everything else was sampled (the stop token is left out)
    assert row.parts == [{"type": "python", "text": "2+3"}, {"type": "python_output", "text": "5"},
                         {"type": "text", "text": "ok"}]


def test_search_injects_exactly_the_retrievers_documents(tokenizer):
    S = tokenizer.special
    docs = [Document("d1", "King", "The old king was born in the river city."),
            Document("d2", "Cat", "The cat sat on the mat."),
            Document("d3", "Dog", "The dog ran under the house.")]
    retriever = make_retriever("simple", docs)
    script = ([S["<|search_start|>"]] + tokenizer.encode("king born") + [S["<|search_end|>"]]
              + tokenizer.encode("river city") + [S["<|assistant_end|>"]])
    model, engine = scripted_engine(tokenizer, script, retriever, search_top_k=2)
    prompt = tokenizer.encode("q", prepend="<|bos|>")
    rows = run_scripted(model, engine, prompt, num_samples=2, max_tokens=40, temperature=0.0)
    expected_docs = [h.document.to_dict() for h in retriever.search("king born", 2)]
    assert expected_docs[0]["id"] == "d1"
    block = tokenizer.render_documents(expected_docs, first_number=1)
    for row in rows:
        completion, mask = row.tokens[len(prompt):], row.mask[len(prompt):]
        k = completion.index(S["<|doc_start|>"])
        assert completion[k:k + len(block)] == block
        assert mask[k:k + len(block)] == [0] * len(block)
        assert sum(mask) == len(script) - 1
        assert row.parts[0] == {"type": "search", "text": "king born"}
        assert row.parts[1] == {"type": "search_results", "documents": expected_docs}
        assert row.parts[2] == {"type": "text", "text": "river city"}


def test_search_caps_hops(tokenizer):
    S = tokenizer.special
    retriever = make_retriever("simple", [Document("d1", "King", "The old king.")])
    one = [S["<|search_start|>"]] + tokenizer.encode("king") + [S["<|search_end|>"]]
    model, engine = scripted_engine(tokenizer, one * 3 + [S["<|assistant_end|>"]], retriever, max_searches=2)
    rows = run_scripted(model, engine, tokenizer.encode("q", prepend="<|bos|>"), max_tokens=40, temperature=0.0)
    results = [p for p in rows[0].parts if p["type"] == "search_results"]
    assert [len(p["documents"]) for p in results] == [1, 1, 0]


def test_tool_only_tokens_never_sampled_and_max_tokens(tokenizer):
    S = tokenizer.special
    for name in BANNED:
        model, engine = scripted_engine(tokenizer, [], favour=S[name])
        for temperature in (0.0, 1.0):
            rows = run_scripted(model, engine, tokenizer.encode("q", prepend="<|bos|>"), num_samples=2,
                                max_tokens=10, temperature=temperature)
            for row in rows:
                assert S[name] not in row.tokens
                assert len(row.tokens) == 2 + 10   # max_tokens counts sampled tokens


def test_injected_tokens_do_not_count_against_max_tokens(tokenizer):
    S = tokenizer.special
    script = [S["<|python_start|>"]] + tokenizer.encode("12*12") + [S["<|python_end|>"]] + tokenizer.encode("the cat") * 5
    model, engine = scripted_engine(tokenizer, script)
    prompt = tokenizer.encode("q", prepend="<|bos|>")
    rows = run_scripted(model, engine, prompt, max_tokens=len(script), temperature=0.0)
    assert sum(rows[0].mask) == len(script)
    assert len(rows[0].tokens) > len(prompt) + len(script)


def test_calculator_is_safe():
    assert use_calculator("2+3*4") == 14
    assert use_calculator("1,000 / 8") == 125
    assert use_calculator("'strawberry'.count('r')") == 3
    for bad in ["__import__('os')", "open('x')", "2**100000", "x+1", "1/0", "[1]*5"]:
        assert use_calculator(bad) is None


def test_param_groups_cover_every_parameter_once(tokenizer):
    model = tiny_model(tokenizer.get_vocab_size())
    groups = model.param_groups()
    seen = [id(p) for g in groups.values() for p in g]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))
    assert all(p.ndim == 2 for p in groups["matrix"])


def test_loss_ignores_minus_one_and_packing_mask(tokenizer):
    model = tiny_model(tokenizer.get_vocab_size())
    x = torch.randint(0, 300, (1, 12))
    y = x.clone()
    y[0, :6] = -1
    per_token = model(x, y, loss_reduction="none")
    assert torch.allclose(model(x, y), per_token[6:].mean())
    # two packed documents with seq_idx give the same logits as running them separately
    a, b = torch.randint(0, 300, (1, 5)), torch.randint(0, 300, (1, 7))
    packed = torch.cat([a, b], 1)
    seq_idx = torch.tensor([[0] * 5 + [1] * 7])
    out = model(packed, seq_idx=seq_idx)
    assert torch.allclose(out[:, :5], model(a), atol=1e-5)
    assert torch.allclose(out[:, 5:], model(b), atol=1e-5)


@pytest.mark.parametrize("pattern", ["TT", "TM", "MM"])
def test_cache_rows_advance_independently(tokenizer, pattern):
    """Prefill in pieces (prompt, then an injected block, then single steps) equals one full forward."""
    model = tiny_model(tokenizer.get_vocab_size(), pattern)
    seq = torch.randint(0, tokenizer.get_vocab_size(), (1, 10))
    full = model(seq)[0]
    cache = InferenceCache(model, 2, 32)
    # row 0 gets 6 then 4 tokens; row 1 gets 10 at once; both must match the full forward
    out0a = model(seq[:, :4], cache=cache, rows=[0])
    out1 = model(seq, cache=cache, rows=[1])
    out0b = model(seq[:, 4:8], cache=cache, rows=[0])
    out0c = [model(seq[:, t:t + 1], cache=cache, rows=[0]) for t in (8, 9)]
    assert torch.allclose(torch.cat([out0a, out0b] + out0c, 1)[0], full, atol=1e-5)
    assert torch.allclose(out1[0], full, atol=1e-5)
    assert cache.lengths.tolist() == [10, 10]


def test_stray_control_tokens_stay_out_of_text(tokenizer):
    S = tokenizer.special
    script = (tokenizer.encode("the") + [S["<|search_end|>"], S["<|python_end|>"]] + tokenizer.encode(" cat")
              + [S["<|assistant_end|>"]])
    model, engine = scripted_engine(tokenizer, script)
    rows = run_scripted(model, engine, tokenizer.encode("q", prepend="<|bos|>"), max_tokens=20, temperature=0.0)
    assert rows[0].parts == [{"type": "text", "text": "the cat"}]
    assert S["<|search_end|>"] in rows[0].tokens   # still in the sequence the model produced (RL trains on it)
