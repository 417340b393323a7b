"""Engine: cache vs no-cache, seeds, tools (calculator and search) injected as masked blocks,
tool-only tokens never sampled, and the GPT's cache/packing mechanics."""
import torch
import pytest

from nanochat.gpt import GPT, GPTConfig, InferenceCache
from nanochat.engine import Engine, use_calculator
from nanochat.retrieval import Document, make_retriever

BANNED = ("<|doc_start|>", "<|doc_end|>", "<|output_start|>", "<|output_end|>")


def tiny_config(vocab_size, pattern, n_embd=64):
    """pattern: block letters, optionally "/conv<taps>" for T blocks with a short conv ("TM/conv3")."""
    pattern, _, conv = pattern.partition("/conv")
    return GPTConfig(sequence_len=128, vocab_size=vocab_size, n_layer=len(pattern), n_head=2, n_kv_head=1,
                     n_embd=n_embd, block_pattern=pattern, mamba_d_state=16, mamba_headdim=16, mamba_chunk_size=8,
                     short_conv=int(conv or 0))


def perturb(model):
    """Zero-initialised projections (and short convs) would make every layer an identity."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.add_(torch.randn_like(p) * 0.05)
        for block in model.transformer.h:
            if getattr(block, "short_conv", None) is not None:
                block.short_conv.add_(torch.randn_like(block.short_conv) * 0.3)


def tiny_model(vocab_size, pattern="TT", seed=0, n_embd=64):
    torch.manual_seed(seed)
    model = GPT(tiny_config(vocab_size, pattern, n_embd))
    model.init_weights()
    perturb(model)
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


@pytest.mark.parametrize("pattern", ["TT", "M", "TM", "MT", "MMTT", "TT/conv4"])
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

    def forward(self, idx, targets=None, cache=None, rows=None, lengths=None, **kw):
        logits = super().forward(idx, targets, cache=cache, rows=rows, lengths=lengths, **kw)
        if cache is None:
            return logits
        rows_t = cache.resolve_rows(rows, idx.size(0))
        forced = torch.full_like(logits, -30.0)
        last = forced if lengths is not None else forced[:, -1]   # (B, V) after each row's last token
        for b, r in enumerate(rows_t.tolist()):
            # the Engine's decode step feeds every row its sampled token (no lengths); the prompt
            # and injected blocks come ragged (with lengths)
            if lengths is None:
                self._sampled[r] = self._sampled.get(r, 0) + 1
            k = self._sampled.get(r, 0)
            if k < len(self.script):
                last[b, self.script[k]] = 30.0
            if self.favour is not None:
                last[b, self.favour] = 100.0
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
    # the third search is never opened: after two, <|search_start|> cannot be sampled, the row writes text
    assert [p["type"] for p in rows[0].parts][:4] == ["search", "search_results", "search", "search_results"]
    assert [len(p["documents"]) for p in rows[0].parts if p["type"] == "search_results"] == [1, 1]
    assert rows[0].tokens.count(S["<|search_start|>"]) == 2 and rows[0].num_searches == 2


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


@pytest.mark.parametrize("pattern", ["TT", "TT/conv4"])
def test_loss_ignores_minus_one_and_packing_mask(tokenizer, pattern):
    model = tiny_model(tokenizer.get_vocab_size(), pattern)
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


@pytest.mark.parametrize("pattern", ["TT", "TM", "MM", "TM/conv3"])
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


class PartlyScriptedGPT(GPT):
    """A real GPT that is pushed, row by row, to write a given opening (a search, a calculator
    call, a stop) and is free (greedy on its own logits) where the script says None. Row r follows
    self.scripts[self.row_script[r]]; r is the row's index in the first cache (self.origin follows
    the rows when the Engine drops finished ones)."""

    def forward(self, idx, targets=None, cache=None, rows=None, lengths=None, **kw):
        logits = super().forward(idx, targets, cache=cache, rows=rows, lengths=lengths, **kw)
        if cache is None:
            return logits
        if not hasattr(cache, "origin"):
            cache.origin = list(range(cache.batch_size))
        last = logits if lengths is not None else logits[:, -1]
        for b, r in enumerate(cache.resolve_rows(rows, idx.size(0)).tolist()):
            r = cache.origin[r]
            if lengths is None:
                self._sampled[r] = self._sampled.get(r, 0) + 1
            script = self.scripts[self.row_script[r]]
            k = self._sampled.get(r, 0)
            if k < len(script) and script[k] is not None:
                last[b, script[k]] += 1000.0
            else:   # free, but tools and stops happen only where the script says
                last[b, self.special_ids] -= 1000.0
        return logits


@pytest.mark.parametrize("pattern", ["TT", "MM", "TM", "TM/conv3"])
def test_batched_prompts_equal_one_at_a_time(tokenizer, pattern, monkeypatch):
    """Several prompts of different lengths, several samples each, generated together: every row
    equals the same prompt generated alone, token for token (greedy), with searches, calculator
    calls and rows that stop at different steps."""
    S = tokenizer.special
    torch.manual_seed(0)
    model = PartlyScriptedGPT(tiny_config(tokenizer.get_vocab_size(), pattern))
    model.init_weights()
    perturb(model)
    model.eval()
    model.special_ids = list(S.values())
    keep = InferenceCache.keep

    kept = []

    def keep_and_follow(cache, rows):   # the scripted model keys its scripts by the first cache's rows
        kept.append(len(rows))
        cache.origin = [cache.origin[r] for r in rows]
        keep(cache, rows)
    monkeypatch.setattr(InferenceCache, "keep", keep_and_follow)
    docs = [Document("d1", "King", "The old king was born in the river city of Ash."),
            Document("d2", "Cat", "The cat sat on the mat near the door."),
            Document("d3", "Dog", "The dog ran under the house and slept.")]
    retriever = make_retriever("simple", docs)
    search = lambda q: [S["<|search_start|>"]] + tokenizer.encode_text(q) + [S["<|search_end|>"]]
    model.scripts = [
        search("king born") + [None] * 3 + [S["<|assistant_end|>"]],              # search, 3 free tokens, stop
        [None, None] + [S["<|python_start|>"]] + tokenizer.encode_text("12*12") + [S["<|python_end|>"]],   # free after the result
        [None] * 5 + search("dog house") + [None] * 2 + search("cat mat") + [None] * 4 + [S["<|assistant_end|>"]],
        [None] * 40,                                                               # never stops: cut by max_tokens
    ]
    prompts = [tokenizer.encode(text, prepend="<|bos|>") for text in
               ("Where was the king born?", "q", "Tell me about the dog and the cat please, in detail.", "The old king")]
    engine = Engine(model, tokenizer, retriever=retriever, search_top_k=2)
    n = 2
    model._sampled, model.row_script = {}, [r // n for r in range(len(prompts) * n)]
    together = engine.generate_batch(prompts, n, max_tokens=30, temperature=0.0)
    assert [r.prompt for r in together] == [r // n for r in range(len(prompts) * n)]
    for p, prompt in enumerate(prompts):
        model._sampled, model.row_script = {}, [p] * n
        alone = engine.generate_batch(prompt, n, max_tokens=30, temperature=0.0)
        for s in range(n):
            row = together[p * n + s]
            assert row.tokens == alone[s].tokens
            assert row.mask == alone[s].mask
            assert row.parts == alone[s].parts
    kinds = [[part["type"] for part in row.parts] for row in together[::n]]
    assert kinds[0][:2] == ["search", "search_results"] and kinds[2].count("search_results") == 2
    assert "python_output" in kinds[1]
    lengths = {sum(row.mask) for row in together}
    assert len(lengths) > 1   # rows stopped at different steps
    assert kept   # ... and the finished ones were dropped from the cache along the way


def test_per_prompt_retrievers_and_seeded_sampling(tokenizer):
    """Each prompt searches its own knowledge base; sampling with a seed is reproducible."""
    S = tokenizer.special
    kb_a = make_retriever("simple", [Document("a1", "Alpha", "Alpha facts.")])
    kb_b = make_retriever("simple", [Document("b1", "Beta", "Beta facts.")])
    script = [S["<|search_start|>"]] + tokenizer.encode("facts") + [S["<|search_end|>"], S["<|assistant_end|>"]]
    model, engine = scripted_engine(tokenizer, script)
    prompts = [tokenizer.encode("q", prepend="<|bos|>"), tokenizer.encode("a longer question", prepend="<|bos|>")]
    model._sampled = {}
    rows = engine.generate_batch(prompts, 2, max_tokens=10, temperature=0.0, retrievers=[kb_a, kb_b], top_ks=[1, 1])
    found = [row.parts[1]["documents"][0]["id"] for row in rows]
    assert found == ["a1", "a1", "b1", "b1"]
    model = tiny_model(tokenizer.get_vocab_size(), "TM")
    engine = Engine(model, tokenizer)
    runs = [[r.tokens for r in engine.generate_batch(prompts, 3, max_tokens=15, temperature=1.0, seed=seed)]
            for seed in (5, 5, 6)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


@pytest.mark.parametrize("pattern", ["TT", "TM", "MM", "TT/conv4"])
def test_ragged_forward_equals_rows_alone(tokenizer, pattern):
    """Rows fed different numbers of tokens in one right-padded forward (lengths) end in the same
    state, with the same last logits, as each row fed alone; the KV cache grows when it must."""
    model = tiny_model(tokenizer.get_vocab_size(), pattern)
    V = tokenizer.get_vocab_size()
    a, b = torch.randint(0, V, (1, 9)), torch.randint(0, V, (1, 4))
    more_a, more_b = torch.randint(0, V, (1, 3)), torch.randint(0, V, (1, 7))
    alone = InferenceCache(model, 2, 8)   # too small on purpose: it must grow
    ref_a = model(a, cache=alone, rows=[0])[0, -1]
    ref_b = model(b, cache=alone, rows=[1])[0, -1]
    ref_a2 = model(more_a, cache=alone, rows=[0])[0, -1]
    ref_b2 = model(more_b, cache=alone, rows=[1])[0, -1]
    ragged = InferenceCache(model, 2, 8)
    x = torch.zeros(2, 9, dtype=torch.long)
    x[0], x[1, :4] = a[0], b[0]
    first = model(x, cache=ragged, lengths=torch.tensor([9, 4]))
    x = torch.zeros(2, 7, dtype=torch.long)
    x[0, :3], x[1] = more_a[0], more_b[0]
    second = model(x, cache=ragged, lengths=torch.tensor([3, 7]))
    assert torch.allclose(first[0], ref_a, atol=1e-5) and torch.allclose(first[1], ref_b, atol=1e-5)
    assert torch.allclose(second[0], ref_a2, atol=1e-5) and torch.allclose(second[1], ref_b2, atol=1e-5)
    assert ragged.lengths.tolist() == [12, 11]


def test_loss_on_supervised_positions_only_equals_full_logits(tokenizer):
    """The head runs only where a target is; loss, per-token loss, hits and gradients are those of
    the full (B, T, V) logits."""
    model = tiny_model(tokenizer.get_vocab_size())
    V = tokenizer.get_vocab_size()
    x = torch.randint(0, V, (3, 10))
    y = torch.randint(0, V, (3, 10))
    y[:, :6] = -1
    y[1, 8] = -1
    logits = model(x)
    full = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none")
    loss, hits = model(x, y, with_hits=True)
    assert torch.allclose(loss, full[y.flatten() >= 0].mean(), atol=1e-6)
    assert torch.allclose(model(x, y, loss_reduction="none"), full, atol=1e-6)
    assert torch.equal(hits, (logits.argmax(-1) == y) & (y >= 0))
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    reference = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-1)
    reference.backward()
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_compiled_training_step_matches_eager(tokenizer):
    """base_train --compile: the compiled module gives the eager loss and gradients (to tolerance)."""
    model = tiny_model(tokenizer.get_vocab_size(), "TM/conv4").train()
    x = torch.randint(0, 300, (2, 16))
    y = torch.randint(0, 300, (2, 16))
    loss = model(x, y)
    loss.backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled_loss = torch.compile(model, dynamic=False)(x, y)
    compiled_loss.backward()
    assert torch.allclose(loss, compiled_loss, atol=1e-5)
    for g, p in zip(eager, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-4)


def test_per_prompt_settings_match_each_prompt_alone(tokenizer):
    """chat_web batches requests with their own max_tokens, temperature, top-k and seed: each row is
    what that prompt gives alone with its settings, and stops at its own max_tokens."""
    model = tiny_model(tokenizer.get_vocab_size(), "TM/conv3")
    engine = Engine(model, tokenizer)
    prompts = [tokenizer.encode(t, prepend="<|bos|>") for t in ("The old king", "A cat", "Blue river flows by")]
    settings = {"max_tokens": [5, 14, 9], "temperature": [0.0, 1.0, 0.7], "top_k": [None, 20, 5], "seed": [1, 2, 3]}
    rows = engine.generate_batch(prompts, **settings)
    for p, prompt in enumerate(prompts):
        mine = {k: v[p] for k, v in settings.items()}
        alone = engine.generate_batch(prompt, **mine)[0]
        assert rows[p].tokens == alone.tokens
        assert len(rows[p].tokens) - len(prompt) <= mine["max_tokens"]
    assert len(rows[0].tokens) - len(prompts[0]) == 5   # greedy, cut at its own limit while the others went on
    with pytest.raises(ValueError, match="one value for each"):
        engine.generate_batch(prompts, max_tokens=[5, 6])


def _greedy_no_tools(model, tokenizer, prompt, n):
    """Greedy decoding with the tool-start tokens banned too, as ensemble decoding bans them."""
    ids = list(prompt)
    banned = [tokenizer.special[t] for t in BANNED + ("<|python_start|>", "<|search_start|>")]
    for _ in range(n):
        logits = model(torch.tensor([ids]))[0, -1]
        logits[banned] = float("-inf")
        logits[tokenizer.get_vocab_size():] = float("-inf")
        ids.append(int(logits.argmax()))
        if ids[-1] in (tokenizer.special["<|assistant_end|>"], tokenizer.bos_token_id):
            return ids[len(prompt):-1]
    return ids[len(prompt):]


def _ensemble(engine, groups, weights=None, n=20):
    out = [[] for _ in groups]
    for step in engine.generate_ensemble(groups, weights, max_tokens=n):
        for g, toks in enumerate(step):
            out[g] += toks
    return out


@pytest.mark.parametrize("pattern", ["TT/conv3", "M", "TM"])
def test_ensemble_decoding_reduces_to_one_document(tokenizer, pattern):
    """k copies of one document = that document alone; a one-hot lambda = that document's generation;
    groups decoded together = each alone."""
    model = tiny_model(tokenizer.get_vocab_size(), pattern)
    engine = Engine(model, tokenizer)
    a = tokenizer.encode("The old king was born in the river city. Where", prepend="<|bos|>")
    b = tokenizer.encode("A dog ran", prepend="<|bos|>")
    c = tokenizer.encode("The queen wrote in the green city and the cat sat", prepend="<|bos|>")
    alone = {name: _greedy_no_tools(model, tokenizer, p, 20) for name, p in (("a", a), ("b", b), ("c", c))}
    assert _ensemble(engine, [[a, a, a]]) == [alone["a"]]
    assert _ensemble(engine, [[b, c, a]], [[0.0, 0.0, 1.0]]) == [alone["a"]]
    assert _ensemble(engine, [[a, b], [c], [b, b, b]], [[1.0, 0.0], [1.0], [0.2, 0.3, 0.5]]) == \
        [alone["a"], alone["c"], alone["b"]]


def test_ensemble_mixes_probabilities_not_logits(tokenizer):
    """First token of a two-document ensemble: argmax of lambda_1 p_1 + lambda_2 p_2, computed by hand."""
    model = tiny_model(tokenizer.get_vocab_size(), "TT")
    engine = Engine(model, tokenizer)
    a = tokenizer.encode("The old king", prepend="<|bos|>")
    b = tokenizer.encode("A dog ran under the blue house", prepend="<|bos|>")
    banned = [tokenizer.special[t] for t in BANNED + ("<|python_start|>", "<|search_start|>")]
    probs = []
    for p in (a, b):
        logits = model(torch.tensor([p]))[0, -1].float()
        logits[banned] = float("-inf")
        logits[tokenizer.get_vocab_size():] = float("-inf")
        probs.append(torch.softmax(logits, -1))
    for lam in (0.3, 0.7):
        expected = int((lam * probs[0] + (1 - lam) * probs[1]).argmax())
        first = next(iter(engine.generate_ensemble([[a, b]], [[lam, 1 - lam]], max_tokens=1)))
        assert first[0] == ([] if expected in engine.stop_tokens else [expected])


def test_copy_answers_keeps_the_answer_a_piece_of_the_documents_shown(tokenizer):
    from nanochat.rag import ABSTAIN
    S = tokenizer.special
    doc = {"id": "d1", "title": "King", "text": "The old king was born in the river city in 1831."}
    conversation = {"messages": [{"role": "retrieval", "documents": [doc]}, {"role": "user", "content": "When was the king born?"}]}
    prompt = tokenizer.render_for_completion(conversation)
    shown = tokenizer.decode(prompt)

    def answer(script, copy_answers, prompt=prompt, retriever=None):
        model, engine = scripted_engine(tokenizer, script + [S["<|assistant_end|>"]], retriever, copy_answers=copy_answers)
        return run_scripted(model, engine, prompt, max_tokens=30, temperature=0.0)[0].parts[-1]["text"]

    # a value the documents hold is written as the model chose, with or without copying
    assert answer(tokenizer.encode_text("river city"), True) == answer(tokenizer.encode_text("river city"), False) == "river city"
    # a garbled value is written freely, or becomes a piece of the document when copied
    garbled = tokenizer.encode_text("river cat 1838")
    assert answer(garbled, False) == "river cat 1838"
    copied = answer(garbled, True)
    assert copied != "river cat 1838" and copied.startswith("river c") and (" " + copied) in shown
    # the space an answer opens with stands for whatever precedes the value in the document (a tab here)
    tabbed = tokenizer.render_for_completion({"messages": [
        {"role": "retrieval", "documents": [{"id": "s", "title": "kpasswd", "text": "kpasswd\t\t464/tcp"}]},
        {"role": "user", "content": "Which port does kpasswd use?"}]})
    assert answer(tokenizer.encode_text("464"), True, prompt=tabbed) == "464"
    assert answer(tokenizer.encode_text("465"), True, prompt=tabbed).startswith("46")
    # the abstention phrase is always there to copy
    assert answer(tokenizer.encode_text(ABSTAIN), True) == ABSTAIN
    # documents a search brought count too; shown none, the answer is free
    bare = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "When was the king born?"}]})
    assert answer(garbled, True, prompt=bare) == "river cat 1838"
    search = [S["<|search_start|>"]] + tokenizer.encode("king") + [S["<|search_end|>"]]
    found = answer(search + garbled, True, prompt=bare, retriever=make_retriever("simple", [Document(**doc)]))
    assert found != "river cat 1838" and (" " + found) in shown
