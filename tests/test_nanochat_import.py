"""Importing karpathy/nanochat checkpoints: tokenizer ids, generation detection, exact logits, refusals.

The checkpoints here are written in nanochat's format by this file itself (every generation of its
GPT, every parameter random), and the logits are checked against `reference_logits`, a direct
transcription of nanochat's forward written for this test, and against transformers'
NanoChatForCausalLM. With NANOCHAT_REPO=<a nanochat checkout> the same check runs against
nanochat's own code (tests/nanochat_reference.py in a subprocess).
"""
import os
import json
import pickle
import random

import pytest
import torch
import torch.nn.functional as F
import tiktoken

from nanochat.tokenizer import Tokenizer, SPECIAL_TOKENS
from nanochat import nanochat_format as nf
from tests.conftest import run_module, make_text

NANOCHAT_SPECIALS = SPECIAL_TOKENS[:9]
# per generation, written out here from nanochat's history (independent of nanochat_format.GENERATIONS)
REF = {
    "G0": dict(rope=1e4, gain=1.0, bf16=True, short=None, gate=None, smear=False, lambdas=False),
    "G1": dict(rope=1e4, gain=1.0, bf16=True, short=lambda T: T // 2, gate=None, smear=False, lambdas=True),
    "G2": dict(rope=1e4, gain=1.0, bf16=True, short=lambda T: T // 2, gate=(32, 2.0), smear=False, lambdas=True),
    "G3": dict(rope=1e5, gain=1.15, bf16=False, short=lambda T: -(-T // 3 // 128) * 128, gate=(12, 3.0), smear=False, lambdas=True),
    "G4": dict(rope=1e5, gain=1.2, bf16=False, short=lambda T: -(-T // 4 // 128) * 128, gate=(12, 3.0), smear=True, lambdas=True),
}
L, H, KV, C, SEQ = 5, 4, 2, 64, 160   # odd depth, GQA; short windows (80 or 128) shorter than the rows (150)
PREFILL, DECODE = 120, 20              # cached decode runs past the 128-token windows too


@pytest.fixture(scope="module")
def nano_tokenizer(tmp_path_factory):
    """A nanochat tokenizer.pkl (a pickled tiktoken Encoding, 9 specials), vocabulary not a multiple of 64."""
    rng = random.Random(0)
    ours = Tokenizer.train_from_iterator(iter([make_text(rng, 50) for _ in range(200)]), 313)
    ranks = ours.enc._mergeable_ranks
    enc = tiktoken.Encoding(name="rustbpe", pat_str=ours.enc._pat_str, mergeable_ranks=ranks,
                            special_tokens={name: len(ranks) + k for k, name in enumerate(NANOCHAT_SPECIALS)})
    d = tmp_path_factory.mktemp("nanochat_tok")
    with open(d / "tokenizer.pkl", "wb") as f:
        pickle.dump(enc, f)
    assert enc.n_vocab % 64 != 0
    return str(d), enc


def random_state(gen, V, seed=0):
    """Every weight nanochat's generation `gen` has, random (none zero), in the dtypes nanochat stores
    on a CPU: embeddings bf16 until March 2026, then the compute dtype (fp32 on a CPU, which also
    keeps the rotary tables in fp32)."""
    g = torch.Generator().manual_seed(seed)
    emb_dtype = torch.bfloat16 if REF[gen]["bf16"] else torch.float32
    rn = lambda *shape, std=1.0: torch.randn(*shape, generator=g) * std
    ru = lambda *shape, lo, hi: lo + (hi - lo) * torch.rand(*shape, generator=g)
    rows, hd = -(-V // 64) * 64 if gen != "G0" else V, C // H
    sd = {"transformer.wte.weight": rn(rows, C).to(emb_dtype), "lm_head.weight": rn(rows, C, std=C ** -0.5)}
    for i in range(L):
        p = f"transformer.h.{i}."
        sd[p + "attn.c_q.weight"] = rn(H * hd, C, std=C ** -0.5)
        sd[p + "attn.c_k.weight"] = rn(KV * hd, C, std=C ** -0.5)
        sd[p + "attn.c_v.weight"] = rn(KV * hd, C, std=C ** -0.5)
        sd[p + "attn.c_proj.weight"] = rn(C, C, std=C ** -0.5)
        sd[p + "mlp.c_fc.weight"] = rn(4 * C, C, std=C ** -0.5)
        sd[p + "mlp.c_proj.weight"] = rn(C, 4 * C, std=0.5 * C ** -0.5)
        if REF[gen]["gate"] and i % 2 == (L - 1) % 2:
            sd[f"value_embeds.{i}.weight"] = rn(rows, KV * hd).to(emb_dtype)
            sd[p + "attn.ve_gate.weight"] = rn(KV, REF[gen]["gate"][0], std=0.5)
    if REF[gen]["lambdas"]:
        sd["resid_lambdas"], sd["x0_lambdas"] = ru(L, lo=0.5, hi=1.5), ru(L, lo=-0.5, hi=0.5)
    if REF[gen]["smear"]:
        sd["smear_gate.weight"], sd["smear_lambda"], sd["backout_lambda"] = rn(1, 24, std=0.5), ru(1, lo=0.3, hi=0.8), ru(1, lo=0.1, hi=0.4)
    return sd


def write_checkpoint(d, gen, V, seed=0, step=7, state=None, meta_extra=None):
    os.makedirs(d, exist_ok=True)
    cfg = {"sequence_len": SEQ, "vocab_size": V, "n_layer": L, "n_head": H, "n_kv_head": KV, "n_embd": C}
    if gen != "G0":
        cfg["window_pattern"] = "SSL"
    sd = state if state is not None else random_state(gen, V, seed)
    torch.save({"_orig_mod." + k: v for k, v in sd.items()}, os.path.join(d, f"model_{step:06d}.pt"))
    with open(os.path.join(d, f"meta_{step:06d}.json"), "w") as f:
        json.dump({"step": step, "val_bpb": 1.0, "model_config": cfg, **(meta_extra or {})}, f)
    return sd, cfg


def reference_logits(sd, gen, cfg, idx):
    """nanochat's forward, transcribed: fp32, full causal attention with its windows."""
    r = REF[gen]
    sd = {k: v.float() for k, v in sd.items()}
    rms = lambda x: F.rms_norm(x, (x.size(-1),))
    B, T = idx.shape
    hd = C // H
    inv = 1.0 / (r["rope"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    f = torch.outer(torch.arange(T, dtype=torch.float32), inv)
    cos, sin = f.cos(), f.sin()
    if r["bf16"]:
        cos, sin = cos.bfloat16().float(), sin.bfloat16().float()
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]

    def rope(x):
        x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
        return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], -1)

    windows = [SEQ] * L
    if r["short"]:
        windows = [SEQ if "SSL"[i % 3] == "L" else r["short"](SEQ) for i in range(L)]
        windows[-1] = SEQ
    pos = torch.arange(T)
    x = rms(sd["transformer.wte.weight"][idx])
    if r["smear"]:
        gate = sd["smear_lambda"] * torch.sigmoid(x[:, 1:, :24] @ sd["smear_gate.weight"].T)
        x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], 1)
    x0, xb = x, None
    for i in range(L):
        p = f"transformer.h.{i}."
        if r["lambdas"]:
            x = sd["resid_lambdas"][i] * x + sd["x0_lambdas"][i] * x0
        h = rms(x)
        q = (h @ sd[p + "attn.c_q.weight"].T).view(B, T, H, hd)
        k = (h @ sd[p + "attn.c_k.weight"].T).view(B, T, KV, hd)
        v = (h @ sd[p + "attn.c_v.weight"].T).view(B, T, KV, hd)
        if f"value_embeds.{i}.weight" in sd:
            w, scale = r["gate"]
            gate = scale * torch.sigmoid(h[..., :w] @ sd[p + "attn.ve_gate.weight"].T)
            v = v + gate.unsqueeze(-1) * sd[f"value_embeds.{i}.weight"][idx].view(B, T, KV, hd)
        q, k = rms(rope(q)) * r["gain"], rms(rope(k)) * r["gain"]
        k, v = k.repeat_interleave(H // KV, 2), v.repeat_interleave(H // KV, 2)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / hd ** 0.5
        visible = (pos[:, None] >= pos[None, :]) & (pos[:, None] - pos[None, :] <= windows[i])
        att = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        y = torch.einsum("bhts,bshd->bthd", att, v).reshape(B, T, C)
        x = x + y @ sd[p + "attn.c_proj.weight"].T
        x = x + F.relu(rms(x) @ sd[p + "mlp.c_fc.weight"].T).square() @ sd[p + "mlp.c_proj.weight"].T
        if r["smear"] and i == L // 2:
            xb = x
    if xb is not None:
        x = x - sd["backout_lambda"] * xb
    logits = rms(x) @ sd["lm_head.weight"][:cfg["vocab_size"]].T
    return 15 * torch.tanh(logits / 15)


def import_checkpoint(src, tok_dir, out, *extra):
    return run_module("scripts.import_nanochat", "--from", str(src), "--tokenizer", str(tok_dir), "--tag", "nano", *extra,
                      base_dir=out, timeout=300)


def load_imported(out, phase="base"):
    from nanochat.checkpoint_manager import load_model
    old = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = str(out)
    try:
        return load_model(phase, "cpu", model_tag="nano")
    finally:
        if old is None:
            del os.environ["NANOCHAT_BASE_DIR"]
        else:
            os.environ["NANOCHAT_BASE_DIR"] = old


def token_rows(V, n=3, T=150, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (n, T), generator=g)


# fp32 noise: nanochat's own cached decode differs from its own full forward by up to 1.3e-5 on these shapes
FULL_TOL, CACHED_TOL = 1e-5, 2e-5


def check_paths(model, expected, idx):
    """Full forward, cached prefill + 20 decode steps, and ragged prefill, against `expected` (B, T, V)."""
    from nanochat.gpt import InferenceCache
    V = expected.size(-1)
    with torch.no_grad():
        full = model(idx)
        assert full.size(-1) >= V
        diffs = {"full": (full[..., :V] - expected).abs().max().item()}
        assert torch.equal(full[..., :V].argmax(-1), expected.argmax(-1))
        cache = InferenceCache(model, idx.size(0), 16)
        steps = [model(idx[:, :PREFILL], cache=cache)[:, -1]]
        steps += [model(idx[:, t:t + 1], cache=cache)[:, -1] for t in range(PREFILL, PREFILL + DECODE)]
        diffs["cached"] = (torch.stack(steps, 1)[..., :V] - expected[:, PREFILL - 1:PREFILL + DECODE]).abs().max().item()
        lengths = torch.tensor([37, 150, 71][:idx.size(0)])
        cache = InferenceCache(model, idx.size(0), 16)
        ragged = model(idx * (torch.arange(idx.size(1)) < lengths[:, None]), cache=cache, lengths=lengths)
        diffs["ragged"] = max((ragged[b, :V] - expected[b, lengths[b] - 1]).abs().max().item() for b in range(idx.size(0)))
    assert diffs["full"] <= FULL_TOL and max(diffs.values()) <= CACHED_TOL, diffs
    return diffs


# ---- tokenizer ----------------------------------------------------------------------------------
def test_tokenizer_pkl_keeps_nanochat_ids_and_appends_ours(nano_tokenizer):
    tok_dir, enc = nano_tokenizer
    tok = nf.read_tokenizer_pkl(os.path.join(tok_dir, "tokenizer.pkl"))
    text = "The old king was born in 1234 and founded the company (red, blue)!\n  Spaces  and\tTabs"
    assert tok.encode(text) == enc.encode_ordinary(text)
    for name in NANOCHAT_SPECIALS:
        assert tok.encode_special(name) == enc.encode_single_token(name)
    V = enc.n_vocab
    assert [tok.encode_special(n) for n in SPECIAL_TOKENS[9:]] == list(range(V, V + 4))
    assert tok.get_vocab_size() == V + 4


def test_unpickler_refuses_anything_but_an_encoding(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    (tmp_path / "evil").mkdir()
    with open(tmp_path / "evil" / "tokenizer.pkl", "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(nf.UserError, match="refusing to unpickle"):
        nf.read_tokenizer_pkl(str(tmp_path / "evil" / "tokenizer.pkl"))
    assert not marker.exists()
    with open(tmp_path / "dict.pkl", "wb") as f:
        pickle.dump({"pat_str": "x"}, f)
    with pytest.raises(nf.UserError, match="not a pickled tiktoken Encoding"):
        nf.read_tokenizer_pkl(str(tmp_path / "dict.pkl"))


# ---- every generation: detection and exact logits -------------------------------------------------
@pytest.mark.parametrize("gen", list(REF))
def test_import_matches_nanochat_forward(gen, nano_tokenizer, tmp_path):
    tok_dir, enc = nano_tokenizer
    V = enc.n_vocab
    sd, cfg = write_checkpoint(tmp_path / "ckpt", gen, V)
    proc = import_checkpoint(tmp_path / "ckpt", tok_dir, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert f"generation {gen}" in proc.stdout
    model, tokenizer, meta = load_imported(tmp_path / "out")
    assert meta["imported_from"]["generation"] == gen and meta["imported_from"]["step"] == 7
    assert tokenizer.get_vocab_size() == V + 4 and model.config.vocab_size % 64 == 0
    idx = token_rows(V)
    check_paths(model, reference_logits(sd, gen, cfg, idx), idx)


def test_vocab_growth_leaves_nanochat_logits_bit_identical(nano_tokenizer):
    from nanochat.gpt import GPT, GPTConfig
    tok_dir, enc = nano_tokenizer
    V = enc.n_vocab
    sd = {k: v.float() for k, v in random_state("G4", V).items()}
    config = nf.model_config({"sequence_len": SEQ, "vocab_size": V, "n_layer": L, "n_head": H, "n_kv_head": KV,
                              "n_embd": C, "window_pattern": "SSL"}, sd, "G4")
    config["vocab_size"] = sd["transformer.wte.weight"].size(0)
    before = GPT(GPTConfig(**config, logit_vocab_size=V))
    before.load_state_dict(sd)
    tok = nf.read_tokenizer_pkl(os.path.join(tok_dir, "tokenizer.pkl"))
    grown, rows = nf.grow_vocab(sd, tok, V)
    after = GPT(GPTConfig(**dict(config, vocab_size=rows), logit_vocab_size=V + 4))
    after.load_state_dict(grown)
    idx = token_rows(V)
    with torch.no_grad():
        a, b = before(idx), after(idx)
    assert torch.equal(a, b[..., :V])
    # the new rows: input rows near their tool token, output rows at the mean
    wte = after.transformer.wte.weight
    doc, out = tok.encode_special("<|doc_start|>"), tok.encode_special("<|output_start|>")
    assert 0 < (wte[doc] - wte[out]).norm() < 0.05 * wte[out].norm()
    assert torch.allclose(after.lm_head.weight[doc], sd["lm_head.weight"][:V].mean(0))


def test_every_parameter_is_in_exactly_one_optimizer_group(nano_tokenizer):
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.optim import setup_optimizers
    sd = random_state("G4", 296)
    config = nf.model_config({"sequence_len": SEQ, "vocab_size": 320, "n_layer": L, "n_head": H, "n_kv_head": KV,
                              "n_embd": C, "window_pattern": "SSL"}, sd, "G4")
    model = GPT(GPTConfig(**config))
    groups = model.param_groups()
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    opt_ids = [id(p) for opt in setup_optimizers(model) for g in opt.param_groups for p in g["params"]]
    assert sorted(opt_ids) == sorted(ids)


def test_features_train_with_packed_documents_and_match_separate_rows():
    """Windows, smear and value embeddings never cross a packed document boundary (seq_idx)."""
    from nanochat.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    config = nf.model_config({"sequence_len": 64, "vocab_size": 128, "n_layer": L, "n_head": H, "n_kv_head": KV,
                              "n_embd": C, "window_pattern": "SSL"}, random_state("G4", 128), "G4")
    model = GPT(GPTConfig(**config))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        idx = torch.randint(0, 128, (1, 50))
        seq_idx = torch.tensor([[0] * 20 + [1] * 30])
        packed = model(idx, seq_idx=seq_idx)
        assert (packed[0, :20] - model(idx[:, :20])[0]).abs().max() < 1e-5
        assert (packed[0, 20:] - model(idx[:, 20:])[0]).abs().max() < 1e-5
    loss = model(idx, targets=idx, seq_idx=seq_idx)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# ---- refusals: one line each, nothing written -----------------------------------------------------------
def expect_refusal(proc, out, needle):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr
    assert not os.path.exists(os.path.join(out, "base_checkpoints"))


def test_bad_inputs_are_refused_with_one_line(nano_tokenizer, tmp_path):
    tok_dir, enc = nano_tokenizer
    V = enc.n_vocab
    sd = random_state("G4", V)
    cases = []
    unknown = dict(sd, **{"transformer.h.0.attn.engram.weight": torch.zeros(4, 4)})
    write_checkpoint(tmp_path / "unknown", "G4", V, state=unknown)
    cases.append((tmp_path / "unknown", tok_dir, "unknown weight 'transformer.h.0.attn.engram.weight'"))
    write_checkpoint(tmp_path / "nometa", "G4", V, state=sd)
    os.remove(tmp_path / "nometa" / "meta_000007.json")
    cases.append((tmp_path / "nometa", tok_dir, "meta_000007.json: missing"))
    odd = {k: (torch.randn(KV, 32) if k.endswith("ve_gate.weight") else v) for k, v in sd.items()}   # G2's gates, G4's smear
    write_checkpoint(tmp_path / "nogen", "G4", V, state=odd)
    cases.append((tmp_path / "nogen", tok_dir, "no known generation"))
    # tokenizers: specials in another order, and a pickle that is not an Encoding
    ranks = enc._mergeable_ranks
    swapped = list(NANOCHAT_SPECIALS)
    swapped[1], swapped[2] = swapped[2], swapped[1]
    (tmp_path / "tok_swapped").mkdir()
    with open(tmp_path / "tok_swapped" / "tokenizer.pkl", "wb") as f:
        pickle.dump(tiktoken.Encoding(name="x", pat_str=enc._pat_str, mergeable_ranks=ranks,
                                      special_tokens={n: len(ranks) + k for k, n in enumerate(swapped)}), f)
    write_checkpoint(tmp_path / "good", "G4", V, state=sd)
    cases.append((tmp_path / "good", tmp_path / "tok_swapped", "differ from nanochat's"))
    (tmp_path / "tok_list").mkdir()
    with open(tmp_path / "tok_list" / "tokenizer.pkl", "wb") as f:
        pickle.dump([1, 2, 3], f)
    cases.append((tmp_path / "good", tmp_path / "tok_list", "not a pickled tiktoken Encoding"))
    for i, (src, tok, needle) in enumerate(cases):
        out = tmp_path / f"out{i}"
        expect_refusal(import_checkpoint(src, tok, out), out, needle)
    # a target directory that holds another tokenizer
    out = tmp_path / "other"
    Tokenizer.train_from_iterator(iter(["some other text entirely"] * 20), 300).save(str(out / "tokenizer"))
    expect_refusal(import_checkpoint(tmp_path / "good", tok_dir, out), out, "holds another tokenizer")


def test_unimported_nanochat_checkpoint_gets_one_line(nano_tokenizer, tmp_path):
    tok_dir, enc = nano_tokenizer
    base = tmp_path / "base"
    write_checkpoint(base / "base_checkpoints" / "d5", "G4", enc.n_vocab)
    # this project's tokenizer beside it, without the check the ids would silently mean other tokens
    nf.read_tokenizer_pkl(os.path.join(tok_dir, "tokenizer.pkl")).save(str(base / "tokenizer"))
    proc = run_module("scripts.chat_cli", "--source", "base", "--model-tag", "d5", "--prompt", "hi", "--retrieval", "off",
                      "--device-type", "cpu", base_dir=base, timeout=120)
    assert proc.returncode != 0
    assert "scripts.import_nanochat" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# ---- transformers' NanoChatForCausalLM ---------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
def test_transformers_nanochat_parity(tied, nano_tokenizer, tmp_path):
    from transformers import NanoChatConfig, NanoChatForCausalLM
    tok_dir, enc = nano_tokenizer
    V = enc.n_vocab
    torch.manual_seed(0)
    hf_config = NanoChatConfig(vocab_size=V, hidden_size=C, intermediate_size=4 * C, num_hidden_layers=L,
                               num_attention_heads=H, num_key_value_heads=KV, max_position_embeddings=SEQ,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, final_logit_softcapping=15.0,
                               tie_word_embeddings=tied)
    hf = NanoChatForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0, 3 * C ** -0.5 if tied or "embed" not in name else 1.0)   # tied: the head's scale
    hf.save_pretrained(tmp_path / "hf")
    proc = run_module("scripts.import_nanochat", "--from", str(tmp_path / "hf"), "--tokenizer", tok_dir, "--tag", "nano",
                      base_dir=tmp_path / "out", timeout=300)
    assert proc.returncode == 0, proc.stderr
    model, _, meta = load_imported(tmp_path / "out")
    assert meta["imported_from"]["format"] == "transformers" and model.config.tie_embeddings == tied
    idx = token_rows(V)
    with torch.no_grad():
        expected = hf(idx).logits.float()
    check_paths(model, expected, idx)


# ---- nanochat's own code (a checkout given by NANOCHAT_REPO) ---------------------------------------------
@pytest.mark.skipif(not os.environ.get("NANOCHAT_REPO"), reason="NANOCHAT_REPO (a karpathy/nanochat checkout) not set")
def test_parity_with_nanochat_checkout(nano_tokenizer, tmp_path):
    import subprocess
    import sys
    import numpy as np
    repo = os.environ["NANOCHAT_REPO"]
    python = os.environ.get("NANOCHAT_PYTHON", sys.executable)
    harness = os.path.join(os.path.dirname(__file__), "nanochat_reference.py")
    tok_dir, enc = nano_tokenizer
    V = enc.n_vocab
    ckpt = tmp_path / "ckpt"
    subprocess.run([python, harness, "make", "--nanochat", repo, "--out", str(ckpt), "--n-layer", str(L), "--n-head", str(H),
                    "--n-kv-head", str(KV), "--n-embd", str(C), "--vocab-size", str(V), "--sequence-len", str(SEQ),
                    "--window-pattern", "SSL", "--seed", "0", "--embed-dtype", "fp32"],   # as on a CPU: fp32 rotary tables
                   check=True, capture_output=True, text=True)
    idx = token_rows(V)
    with open(tmp_path / "tokens.json", "w") as f:
        json.dump(idx.tolist(), f)
    subprocess.run([python, harness, "logits", "--nanochat", repo, "--ckpt", str(ckpt), "--tokens", str(tmp_path / "tokens.json"),
                    "--out", str(tmp_path / "ref.npz"), "--prefill", str(PREFILL), "--decode", str(DECODE)], check=True, capture_output=True, text=True)
    ref = np.load(tmp_path / "ref.npz")
    expected = torch.stack([torch.from_numpy(ref[f"full_{r}"]) for r in range(idx.size(0))])
    # NANOCHAT_IMPORT_ARGS: what the weights cannot tell, e.g. "--softcap 20" for commits aba30cb..6ed7d1d
    proc = import_checkpoint(ckpt, tok_dir, tmp_path / "out", *os.environ.get("NANOCHAT_IMPORT_ARGS", "").split())
    assert proc.returncode == 0, proc.stderr
    model, _, meta = load_imported(tmp_path / "out")
    diffs = check_paths(model, expected, idx)
    if "cached" in ref:   # nanochat's own cached decode agrees with ours too
        with torch.no_grad():
            full = model(idx[:1])[0, PREFILL - 1:PREFILL + DECODE, :V]
        diffs["nanochat_cached"] = (full - torch.from_numpy(ref["cached"])).abs().max().item()
        assert diffs["nanochat_cached"] <= CACHED_TOL, diffs
    print(meta["imported_from"]["generation"], diffs)


def test_short_conv_added_at_import_keeps_the_logits(nano_tokenizer, tmp_path):
    tok_dir, enc = nano_tokenizer
    sd, cfg = write_checkpoint(tmp_path / "ckpt", "G4", enc.n_vocab)
    proc = import_checkpoint(tmp_path / "ckpt", tok_dir, tmp_path / "out", "--short-conv", "4")
    assert proc.returncode == 0, proc.stderr
    model, _, _ = load_imported(tmp_path / "out")
    assert model.config.short_conv == 4
    idx = token_rows(enc.n_vocab)
    check_paths(model, reference_logits(sd, "G4", cfg, idx), idx)


# ---- the whole pipeline on an imported model --------------------------------------------------------
@pytest.mark.slow
def test_speedrun_from_nanochat_smoke(tmp_path):
    """speedrun_rag.sh --smoke --from-nanochat: import instead of tokenizer + pretraining, then every stage."""
    from tests.conftest import REPO
    import subprocess
    from tasks.pretraining import world_document
    rng = random.Random(0)
    texts = [world_document(i, "train") for i in range(300)] + [make_text(rng, 40) for _ in range(50)]
    ours = Tokenizer.train_from_iterator(iter(texts), 700)
    ranks = ours.enc._mergeable_ranks
    enc = tiktoken.Encoding(name="rustbpe", pat_str=ours.enc._pat_str, mergeable_ranks=ranks,
                            special_tokens={name: len(ranks) + k for k, name in enumerate(NANOCHAT_SPECIALS)})
    (tmp_path / "nc" / "tokenizer").mkdir(parents=True)
    with open(tmp_path / "nc" / "tokenizer" / "tokenizer.pkl", "wb") as f:
        pickle.dump(enc, f)
    ckpt = tmp_path / "nc" / "base_checkpoints" / "d2"
    os.makedirs(ckpt)
    g = torch.Generator().manual_seed(0)
    V, rows, Cs, Ls = enc.n_vocab, -(-enc.n_vocab // 64) * 64, 64, 2
    sd = {"transformer.wte.weight": torch.randn(rows, Cs, generator=g).bfloat16(),
          "lm_head.weight": torch.randn(rows, Cs, generator=g) * 0.01,
          "resid_lambdas": torch.ones(Ls), "x0_lambdas": torch.zeros(Ls), "smear_gate.weight": torch.zeros(1, 24),
          "smear_lambda": torch.zeros(1), "backout_lambda": torch.full((1,), 0.2),
          "value_embeds.1.weight": torch.randn(rows, Cs, generator=g).bfloat16(),
          "transformer.h.1.attn.ve_gate.weight": torch.zeros(2, 12)}
    for i in range(Ls):
        for name, shape in (("attn.c_q", (Cs, Cs)), ("attn.c_k", (Cs, Cs)), ("attn.c_v", (Cs, Cs)), ("attn.c_proj", (Cs, Cs)),
                            ("mlp.c_fc", (4 * Cs, Cs)), ("mlp.c_proj", (Cs, 4 * Cs))):
            sd[f"transformer.h.{i}.{name}.weight"] = torch.randn(*shape, generator=g) * Cs ** -0.5
    torch.save(sd, ckpt / "model_000100.pt")
    with open(ckpt / "meta_000100.json", "w") as f:
        json.dump({"step": 100, "model_config": {"sequence_len": 256, "vocab_size": V, "n_layer": Ls, "n_head": 2,
                                                 "n_kv_head": 2, "n_embd": Cs, "window_pattern": "SL"}}, f)
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("NPROC", "RUN_DIR", "BLOCK_PATTERN"):
        env.pop(name, None)
    run_dir = tmp_path / "run"
    proc = subprocess.run(["bash", "speedrun_rag.sh", "--smoke", "--run-dir", str(run_dir), "--from-nanochat", str(ckpt),
                           "--nanochat-tokenizer", str(tmp_path / "nc" / "tokenizer")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "generation G4" in out and "== tokenizer" not in out and "== base" not in out
    for stage in ("import", "sft", "rl", "kb", "eval", "transfer", "report"):
        assert (run_dir / "logs" / f"{stage}.done").exists(), stage
    report = (run_dir / "report.md").read_text()
    assert "imported with `scripts.import_nanochat`" in report and "| import |" in report


def test_transformers_tokenizer_json_encodes_as_nanochat(nano_tokenizer, tmp_path):
    """A tokenizer.json as transformers' tiktoken converter writes it (the hub's nanochat repositories)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter
    tok_dir, enc = nano_tokenizer
    nf.read_tokenizer_pkl(os.path.join(tok_dir, "tokenizer.pkl")).save(str(tmp_path / "ours"))
    converted = TikTokenConverter(vocab_file=str(tmp_path / "ours" / "mergeable_ranks.tiktoken"), pattern=enc._pat_str,
                                  extra_special_tokens=list(NANOCHAT_SPECIALS)).converted()
    converted.save(str(tmp_path / "tokenizer.json"))
    tok = nf.read_tokenizer_json(str(tmp_path / "tokenizer.json"), "unused")
    text = "The red king (1234) lived in a city; over   the river!\nA new line."
    assert tok.encode(text) == enc.encode_ordinary(text) == converted.encode(text).ids
    assert [tok.encode_special(n) for n in NANOCHAT_SPECIALS] == [enc.encode_single_token(n) for n in NANOCHAT_SPECIALS]


def test_chat_model_import_renders_as_nanochat(nano_tokenizer, tmp_path):
    """--as sft: a nanochat chat model sees message text as nanochat rendered it (no leading space)."""
    tok_dir, enc = nano_tokenizer
    write_checkpoint(tmp_path / "ckpt", "G4", enc.n_vocab)
    proc = import_checkpoint(tmp_path / "ckpt", tok_dir, tmp_path / "out", "--as", "sft")
    assert proc.returncode == 0, proc.stderr
    assert "scripts.chat_cli --source sft" in proc.stdout
    _, tokenizer, meta = load_imported(tmp_path / "out", phase="sft")
    assert meta["text_prefix"] == "" and tokenizer.text_prefix == ""
    ids, _ = tokenizer.render_conversation({"messages": [{"role": "user", "content": "the red king"},
                                                          {"role": "assistant", "content": "a city"}]})
    S = tokenizer.special
    assert ids == ([S["<|bos|>"], S["<|user_start|>"]] + enc.encode_ordinary("the red king") + [S["<|user_end|>"], S["<|assistant_start|>"]]
                   + enc.encode_ordinary("a city") + [S["<|assistant_end|>"]])
    assert tokenizer.decode_text(enc.encode_ordinary("a city")) == "a city"
