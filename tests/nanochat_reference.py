#!/usr/bin/env python
"""
Reference harness: run karpathy/nanochat's OWN model code (from a checkout) on CPU in fp32,
so that our importer of nanochat checkpoints can be checked for exact logit parity.

Nothing from nanochat is copied here: the checkout given with --nanochat DIR is put first on
sys.path and `nanochat.gpt`, `nanochat.engine`, `nanochat.checkpoint_manager` are imported from it
at run time. Our own `nanochat` package (editable install of /work/main) is kept out of the way.
Run it as a subprocess (one nanochat checkout per process), e.g.

    PY=/work/main/.venv/bin/python
    $PY tests/nanochat_reference.py tokens --out /tmp/t.json --vocab-size 1000 --lengths 100,37,64
    $PY tests/nanochat_reference.py make   --nanochat /work/nanochat_gens/g4_master --out /tmp/ck \
        --n-layer 5 --n-head 4 --n-kv-head 2 --n-embd 128 --vocab-size 1000 --sequence-len 64 \
        --window-pattern SSL --seed 0
    $PY tests/nanochat_reference.py logits --nanochat /work/nanochat_gens/g4_master --ckpt /tmp/ck \
        --tokens /tmp/t.json --out /tmp/o.npz --prefill 60 --decode 20 [--chunk 8]
    $PY tests/nanochat_reference.py compare --npz /tmp/o.npz

Subcommands:
  make     build nanochat's GPT (meta device -> to_empty -> init_weights, like its build_model),
           re-randomise EVERY parameter (so zero-initialised features cannot hide bugs), and save
           model_000000.pt + meta_000000.json through the checkout's own save_checkpoint.
           Embedding tables (wte, value_embeds.*) are stored in bf16 by default, as a CUDA
           training run of every generation stores them (--embed-dtype fp32 for a CPU-style ckpt).
  logits   load with the checkout's own checkpoint_manager.build_model on CPU (it casts bf16->fp32
           on CPU from g0_2c4473d on; for the original g0_3a5e0bc the harness upcasts the bf16 wte
           parameter itself because that commit has no CPU path), eval mode, fp32, and write OUT.npz:
             full_<r>        (T_r, vocab) float32 full-forward logits of row r (sliced + soft-capped)
             tokens_<r>      the row's token ids
             cached          (1+decode, vocab): Engine-style path on row 0: batch-1 prefill of the
                             first P tokens into engine.KVCache(seq_len=P), KVCache.prefill() copy into
                             a decode cache (seq_len=P+decode), then `decode` single-token steps
                             (teacher forcing). Row i of `cached` corresponds to full_0[P-1+i].
             cached_positions  int array P-1 .. P-1+decode
             chunk (--chunk K) (K, vocab): prefill P tokens, then ONE K-token forward into the same
                             non-empty cache; corresponds to full_0[P:P+K] (chunk_positions).
  compare  print max|cached - full| (and chunk) for an npz, or max|full_a - full_b| vs --other.
  tokens   write a TOKENS.json of random rows.
  fa3-check  (diagnostic) compare this harness's FA3 emulation (used only for g1_fbc1484, whose
           gpt.py hard-requires the CUDA FA3 kernel from the HF hub) against the SDPA fallback in
           a later checkout's nanochat/flash_attention.py (e.g. --nanochat .../g2_535f664).

Environment: the harness hides CUDA (CUDA_VISIBLE_DEVICES=""), forces NANOCHAT_DTYPE=float32
(COMPUTE_DTYPE exists from g3_6ed7d1d on; on CPU it would auto-detect fp32 anyway), points
NANOCHAT_BASE_DIR at a temp dir, uses 1 CPU thread, stubs the `kernels` module (no hub
downloads) and, only if missing, `wandb`/`psutil` (irrelevant to the forward pass).
"""
import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)

# Known checkouts (git worktrees of karpathy/nanochat). Override the parent dir with NANOCHAT_GENS_DIR.
GENS_DIR = os.environ.get("NANOCHAT_GENS_DIR", "/work/nanochat_gens")
GENERATIONS = {
    name: os.path.join(GENS_DIR, name)
    for name in ["g0_3a5e0bc", "g0_2c4473d", "g1_fbc1484", "g2_535f664", "g2_aba30cb", "g3_6ed7d1d", "g4_master"]
}


def run_reference(argv, python=None, timeout=900, check=True):
    """Helper for tests: run this script in a subprocess. argv is the list after the script name."""
    python = python or sys.executable
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return subprocess.run([python, os.path.abspath(__file__)] + list(argv), env=env, timeout=timeout,
                          check=check, capture_output=True, text=True)


# =============================================================================
# Environment setup: make `import nanochat` resolve to the checkout, CPU/fp32 only
# =============================================================================
_STATE = {"dir": None, "notes": []}


def _note(msg):
    _STATE["notes"].append(msg)
    print(f"[harness] {msg}", file=sys.stderr)


def _install_stub(name, **attrs):
    import types
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    mod.__harness_stub__ = True
    sys.modules[name] = mod
    return mod


def setup_nanochat(nanochat_dir):
    """Put the checkout first on sys.path and hide our own nanochat package. Must run before torch import."""
    nanochat_dir = os.path.abspath(nanochat_dir)
    assert os.path.isfile(os.path.join(nanochat_dir, "nanochat", "gpt.py")), f"not a nanochat checkout: {nanochat_dir}"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""          # CPU only: nanochat picks FA3/bf16 only when CUDA is visible
    os.environ["NANOCHAT_DTYPE"] = "float32"         # g3+: COMPUTE_DTYPE (rotary tables, activations, KV cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("RANK", "0")               # g0_3a5e0bc save_checkpoint asserts RANK==0 (default 0)
    import tempfile
    os.environ["NANOCHAT_BASE_DIR"] = os.path.join(tempfile.gettempdir(), "nanochat_ref_base")  # never used for real
    # drop our repo (and the tests dir) from sys.path, and the editable-install finder of our package
    bad = {os.path.realpath(p) for p in (REPO_ROOT, HERE)}
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) not in bad]
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
    for m in list(sys.modules):
        if m == "nanochat" or m.startswith("nanochat."):
            del sys.modules[m]
    sys.path.insert(0, nanochat_dir)
    _STATE["dir"] = nanochat_dir

    # `kernels` (HF hub kernel loader): g1_fbc1484's gpt.py does get_kernel('varunneal/flash-attention-3')
    # at import time and has no non-FA3 path. Replace with an FA3-semantics SDPA emulation (fp32).
    # g2+ never touch `kernels` without CUDA; the stub just guarantees no network access.
    def _get_kernel(name, *a, **k):
        _note(f"kernels.get_kernel({name!r}) -> harness FA3 emulation (SDPA, FA3 window semantics)")
        import types
        return types.SimpleNamespace(flash_attn_interface=types.SimpleNamespace(
            flash_attn_func=fa3_flash_attn_func, flash_attn_with_kvcache=fa3_flash_attn_with_kvcache))
    _install_stub("kernels", get_kernel=_get_kernel, has_kernel=lambda *a, **k: False)
    # modules irrelevant to the forward pass: stub only if not installed
    import importlib.util
    for name in ["wandb", "psutil"]:
        if importlib.util.find_spec(name) is None:
            _install_stub(name)

    import torch
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)
    import nanochat
    src = os.path.realpath(os.path.dirname(nanochat.__file__))
    assert src == os.path.realpath(os.path.join(nanochat_dir, "nanochat")), f"wrong nanochat imported: {src}"
    return nanochat_dir


# =============================================================================
# FA3 emulation (only used for g1_fbc1484). Semantics of flash_attn_interface (FA3):
#   layout (B, T, H, D); GQA when H_kv < H; softmax scale 1/sqrt(D);
#   window_size=(left, right): query at absolute pos i sees keys j with i-left <= j <= i+right
#   (-1 = unlimited), causal => right = 0; queries are bottom-right aligned to the keys, i.e.
#   with a kv cache query t of the new chunk sits at absolute position cache_seqlens + t.
#   flash_attn_with_kvcache writes k/v into k_cache/v_cache in place at cache_seqlens[b].
# =============================================================================
def _fa3_attend(q, k, v, q_pos0, causal, window_size):
    """q (B,Tq,H,D); k,v (B,Tk,Hk,D); q_pos0: (B,) absolute position of the first query."""
    import torch
    import torch.nn.functional as F
    B, Tq, H, D = q.shape
    Tk = k.size(1)
    left, right = window_size
    if causal:
        right = 0
    row = q_pos0.view(B, 1, 1, 1).long() + torch.arange(Tq, device=q.device).view(1, 1, Tq, 1)
    col = torch.arange(Tk, device=q.device).view(1, 1, 1, Tk)
    mask = torch.ones(B, 1, Tq, Tk, dtype=torch.bool, device=q.device)
    if right >= 0:
        mask = mask & (col <= row + right)
    if left >= 0:
        mask = mask & (col >= row - left)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, enable_gqa=(q.size(2) != k.size(2)))
    return y.transpose(1, 2)


def fa3_flash_attn_func(q, k, v, causal=False, window_size=(-1, -1), softmax_scale=None, **kwargs):
    import torch
    assert softmax_scale is None and not kwargs, "FA3 emulation: unsupported arguments"
    B, T = q.shape[:2]
    return _fa3_attend(q, k, v, torch.zeros(B, dtype=torch.long, device=q.device), causal, tuple(window_size))


def fa3_flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, causal=False,
                                window_size=(-1, -1), softmax_scale=None, **kwargs):
    import torch
    assert softmax_scale is None and not kwargs, "FA3 emulation: unsupported arguments"
    B, Tn = q.shape[:2]
    seqlens = cache_seqlens.long() if cache_seqlens is not None else torch.zeros(B, dtype=torch.long)
    if k is not None:
        for b in range(B):
            p = int(seqlens[b])
            k_cache[b, p:p + Tn] = k[b]
            v_cache[b, p:p + Tn] = v[b]
        total = seqlens + Tn
    else:
        total = seqlens
    assert int(total.min()) == int(total.max()), "FA3 emulation: ragged batches not supported"
    L = int(total[0])
    # queries are bottom-right aligned: the first new query sits at absolute position total - Tn
    return _fa3_attend(q, k_cache[:, :L], v_cache[:, :L], total - Tn, causal, tuple(window_size))


# =============================================================================
# helpers
# =============================================================================
def _import_nanochat():
    import nanochat.gpt as gpt
    import nanochat.checkpoint_manager as cm
    import nanochat.engine as engine
    return gpt, cm, engine


def _describe(gpt_mod, model):
    """Facts read off the live model / module (printed by make and logits)."""
    import dataclasses
    info = {
        "nanochat_dir": _STATE["dir"],
        "config_fields": [f.name for f in dataclasses.fields(gpt_mod.GPTConfig)],
        "padded_vocab": model.lm_head.weight.shape[0],
        "rope_table_dtype": str(model.cos.dtype),
        "window_sizes": getattr(model, "window_sizes", None),
        "compute_dtype": str(getattr(sys.modules.get("nanochat.common"), "COMPUTE_DTYPE", "n/a")),
    }
    fa = sys.modules.get("nanochat.flash_attention")
    if fa is not None:
        info["flash_attention"] = "FA3" if getattr(fa, "USE_FA3", getattr(fa, "HAS_FA3", False)) else "SDPA fallback"
    elif "flash_attn" in vars(gpt_mod):
        info["flash_attention"] = "harness FA3 emulation"
    else:
        info["flash_attention"] = "inline SDPA (gpt.py)"
    return info


def _state_dict_report(sd):
    for k, v in sd.items():
        print(f"  {k:45s} {str(tuple(v.shape)):18s} {str(v.dtype)}")


# =============================================================================
# make
# =============================================================================
def _rerandomise(model, seed):
    """Overwrite every parameter with seeded random values (fp32 draw, cast to the param dtype)."""
    import math
    import torch
    g = torch.Generator().manual_seed(seed)
    embed_params = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, torch.nn.Embedding):
            embed_params.add(f"{mname}.weight" if mname else "weight")

    def signed_uniform(shape, lo, hi):  # magnitude in [lo, hi), random sign: never ~0
        mag = lo + (hi - lo) * torch.rand(shape, generator=g)
        sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
        return mag * sign

    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = tuple(p.shape)
            parts = name.split(".")
            leaf = parts[-2] if parts[-1] == "weight" and len(parts) > 1 else parts[-1]   # owning module name
            if name in embed_params:
                val = torch.randn(shape, generator=g)                               # embeddings: N(0, 1)
            elif name == "resid_lambdas":
                val = 0.5 + torch.rand(shape, generator=g)                          # U(0.5, 1.5)
            elif name in ("x0_lambdas", "smear_lambda", "backout_lambda"):
                val = signed_uniform(shape, 0.15, 0.5)                               # +-U(0.15, 0.5)
            elif leaf in ("ve_gate", "smear_gate"):
                val = 0.5 * torch.randn(shape, generator=g)                         # gates: N(0, 0.5^2)
            elif name == "lm_head.weight":
                val = 3.0 / math.sqrt(shape[1]) * torch.randn(shape, generator=g)   # logits ~N(0,9): softcap matters
            elif len(shape) == 2:
                val = torch.randn(shape, generator=g) / math.sqrt(shape[1])         # matrices: N(0, 1/fan_in)
            else:
                _note(f"unknown parameter kind {name} {shape}: N(0, 0.25)")
                val = 0.5 * torch.randn(shape, generator=g)
            p.copy_(val.to(p.dtype))
    return embed_params


def cmd_make(args):
    setup_nanochat(args.nanochat)
    import dataclasses
    import torch
    gpt, cm, _ = _import_nanochat()
    fields = [f.name for f in dataclasses.fields(gpt.GPTConfig)]
    kw = dict(sequence_len=args.sequence_len, vocab_size=args.vocab_size, n_layer=args.n_layer,
              n_head=args.n_head, n_kv_head=args.n_kv_head, n_embd=args.n_embd)
    if args.window_pattern is not None:
        if "window_pattern" in fields:
            kw["window_pattern"] = args.window_pattern
        else:
            _note(f"GPTConfig of this commit has no window_pattern: ignoring --window-pattern {args.window_pattern}")
    unknown = [k for k in kw if k not in fields]
    assert not unknown, f"GPTConfig lacks {unknown}"
    config = gpt.GPTConfig(**kw)
    model_config = dataclasses.asdict(config)   # exactly the GPTConfig fields of this commit
    # build exactly like checkpoint_manager.build_model does (all generations): meta -> to_empty -> init_weights
    with torch.device("meta"):
        model = gpt.GPT(config)
    model.to_empty(device=torch.device("cpu"))
    model.init_weights()
    embed_params = _rerandomise(model, args.seed)
    sd = model.state_dict()
    if args.embed_dtype == "bf16":
        sd = {k: (v.to(torch.bfloat16) if k in embed_params else v) for k, v in sd.items()}
    else:
        sd = {k: (v.float() if k in embed_params else v) for k, v in sd.items()}
    meta = {"step": 0, "model_config": model_config, "harness": {"seed": args.seed, "embed_dtype": args.embed_dtype,
            "nanochat_dir": _STATE["dir"]}}
    out = os.path.abspath(args.out)
    # the checkout's own save_checkpoint: (dir, step, model_data, optimizer_data, meta_data[, rank])
    cm.save_checkpoint(out, 0, sd, None, meta)
    print(json.dumps({"model_config": model_config, **_describe(gpt, model)}, indent=None, default=str))
    print("state dict:")
    _state_dict_report(sd)


# =============================================================================
# logits
# =============================================================================
class _FakeTokenizer:
    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def get_vocab_size(self):
        return self.vocab_size


def load_reference_model(ckpt_dir, step=None):
    import torch
    gpt, cm, _ = _import_nanochat()
    ckpt_dir = os.path.abspath(ckpt_dir)
    if step is None:
        step = cm.find_last_step(ckpt_dir)
    with open(os.path.join(ckpt_dir, f"meta_{step:06d}.json")) as f:
        vocab = json.load(f)["model_config"]["vocab_size"]
    cm.get_tokenizer = lambda *a, **k: _FakeTokenizer(vocab)   # build_model only checks the vocab size
    model, _, meta = cm.build_model(ckpt_dir, step, torch.device("cpu"), phase="eval")
    # g0_3a5e0bc has no CPU path: its GPT.__init__ always makes wte bf16 and build_model doesn't upcast,
    # so its forward would mix bf16 activations with fp32 Linear weights. Upcast parameters only
    # (exact), never the bf16 rotary buffers, which are part of what must be matched.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dtype != torch.float32:
                _note(f"upcasting parameter {name} {p.dtype} -> float32")
                p.data = p.data.float()
    model.eval()
    return gpt, model, meta


def _make_kv_cache(engine, model, seq_len):
    import inspect
    import torch
    m = model.config
    kw = dict(batch_size=1, num_heads=m.n_kv_head, seq_len=seq_len, head_dim=m.n_embd // m.n_head, num_layers=m.n_layer)
    params = inspect.signature(engine.KVCache.__init__).parameters
    if "device" in params:
        kw["device"] = torch.device("cpu")
    if "dtype" in params:
        kw["dtype"] = torch.float32   # g1's default is bf16 (its Engine passed nothing); g2/g3 Engine: fp32 on CPU; g4: COMPUTE_DTYPE
    return engine.KVCache(**kw)


def cmd_logits(args):
    setup_nanochat(args.nanochat)
    import numpy as np
    import torch
    gpt, model, meta = load_reference_model(args.ckpt, args.step)
    _, _, engine = _import_nanochat()
    with open(args.tokens) as f:
        rows = json.load(f)
    assert isinstance(rows, list) and rows and all(isinstance(r, list) and r for r in rows), "TOKENS.json: list of rows"
    out = {}
    info = _describe(gpt, model)
    with torch.inference_mode():
        for r, row in enumerate(rows):
            ids = torch.tensor([row], dtype=torch.long)
            logits = model(ids)
            out[f"full_{r}"] = logits[0].float().numpy()
            out[f"tokens_{r}"] = np.asarray(row, dtype=np.int64)
        row0 = rows[0]
        D = args.decode
        P = args.prefill if args.prefill is not None else len(row0) - D
        assert P >= 1 and P + D <= len(row0), f"need 1 <= prefill and prefill+decode <= len(row0)={len(row0)}"
        ids = torch.tensor([row0], dtype=torch.long)
        if not args.no_cached:
            # mirror Engine.generate: batch-1 prefill cache sized to the prompt, copied into a decode cache
            pre = _make_kv_cache(engine, model, P)
            steps = [model.forward(ids[:, :P], kv_cache=pre)[:, -1, :]]
            dec = _make_kv_cache(engine, model, P + D)
            dec.prefill(pre)
            for t in range(P, P + D):
                steps.append(model.forward(ids[:, t:t + 1], kv_cache=dec)[:, -1, :])
            out["cached"] = torch.cat(steps, 0).float().numpy()
            out["cached_positions"] = np.arange(P - 1, P + D, dtype=np.int64)
        if args.chunk:
            K = args.chunk
            assert P + K <= len(row0)
            c = _make_kv_cache(engine, model, P + K)
            model.forward(ids[:, :P], kv_cache=c)
            out["chunk"] = model.forward(ids[:, P:P + K], kv_cache=c)[0].float().numpy()
            out["chunk_positions"] = np.arange(P, P + K, dtype=np.int64)
    out["info"] = np.asarray(json.dumps({**info, "notes": _STATE["notes"], "prefill": P, "decode": D}, default=str))
    np.savez(os.path.abspath(args.out), **out)
    print(json.dumps({**info, "prefill": P, "decode": D, "rows": len(rows)}, default=str))
    if "cached" in out:
        ref = out["full_0"][out["cached_positions"]]
        print(f"max|cached - full| = {np.abs(out['cached'] - ref).max():.3e}")
    if "chunk" in out:
        ref = out["full_0"][out["chunk_positions"]]
        d = np.abs(out["chunk"] - ref).max(axis=1)
        print(f"max|chunk - full| = {d.max():.3e}  (per position: {' '.join(f'{x:.1e}' for x in d)})")


# =============================================================================
# compare / tokens / fa3-check
# =============================================================================
def cmd_compare(args):
    import numpy as np
    a = np.load(args.npz)
    res = {}
    if args.other:
        b = np.load(args.other)
        for k in sorted(a.files):
            if k.startswith("full_") and k in b.files:
                res[k] = float(np.abs(a[k] - b[k]).max())
        if "cached" in a.files and "cached" in b.files:
            res["cached"] = float(np.abs(a["cached"] - b["cached"]).max())
    else:
        if "cached" in a.files:
            res["cached_vs_full"] = float(np.abs(a["cached"] - a["full_0"][a["cached_positions"]]).max())
        if "chunk" in a.files:
            res["chunk_vs_full"] = float(np.abs(a["chunk"] - a["full_0"][a["chunk_positions"]]).max())
            res["chunk_first_pos"] = float(np.abs(a["chunk"][0] - a["full_0"][a["chunk_positions"][0]]).max())
            if len(a["chunk"]) > 1:
                res["chunk_rest"] = float(np.abs(a["chunk"][1:] - a["full_0"][a["chunk_positions"][1:]]).max())
    print(json.dumps(res))


def cmd_tokens(args):
    import random
    rng = random.Random(args.seed)
    rows = [[rng.randrange(args.vocab_size) for _ in range(int(n))] for n in args.lengths.split(",")]
    with open(args.out, "w") as f:
        json.dump(rows, f)
    print(f"wrote {len(rows)} rows to {args.out}")


def cmd_fa3_check(args):
    """Compare the harness FA3 emulation with the checkout's flash_attention SDPA fallback."""
    setup_nanochat(args.nanochat)
    import torch
    from nanochat.flash_attention import flash_attn
    g = torch.Generator().manual_seed(0)
    B, H, Hk, D = 1, 4, 2, 16
    worst = 0.0
    for T in (1, 5, 40, 100):
        for w in ((-1, 0), (8, 0), (32, 0), (64, 0), (200, 0)):
            q, k, v = (torch.randn(B, T, h, D, generator=g) for h in (H, Hk, Hk))
            if T > 1 or w[0] < 0:
                worst = max(worst, (fa3_flash_attn_func(q, k, v, causal=True, window_size=w)
                                    - flash_attn.flash_attn_func(q, k, v, causal=True, window_size=w)).abs().max().item())
            for pos in (0, 3, 50):
                kc = torch.randn(B, pos + T, Hk, D, generator=g)
                vc = torch.randn(B, pos + T, Hk, D, generator=g)
                kc2, vc2 = kc.clone(), vc.clone()
                sl = torch.full((B,), pos, dtype=torch.int32)
                y1 = fa3_flash_attn_with_kvcache(q, kc, vc, k=k, v=v, cache_seqlens=sl, causal=True, window_size=w)
                y2 = flash_attn.flash_attn_with_kvcache(q, kc2, vc2, k=k, v=v, cache_seqlens=sl, causal=True, window_size=w)
                worst = max(worst, (y1 - y2).abs().max().item(), (kc - kc2).abs().max().item())
    print(f"max |FA3 emulation - {args.nanochat} flash_attention fallback| = {worst:.3e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("make")
    p.add_argument("--nanochat", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--n-layer", type=int, default=5)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-kv-head", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=1000)
    p.add_argument("--sequence-len", type=int, default=64)
    p.add_argument("--window-pattern", default=None, help="only for commits whose GPTConfig has window_pattern")
    p.add_argument("--embed-dtype", choices=["bf16", "fp32"], default="bf16",
                   help="storage dtype of wte/value_embeds (bf16 = what a CUDA run of nanochat stores)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_make)
    p = sub.add_parser("logits")
    p.add_argument("--nanochat", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--tokens", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--prefill", type=int, default=None, help="default len(row0) - decode")
    p.add_argument("--decode", type=int, default=20)
    p.add_argument("--chunk", type=int, default=0, help="also: prefill P then one K-token chunk (non-empty cache)")
    p.add_argument("--no-cached", action="store_true")
    p.set_defaults(fn=cmd_logits)
    p = sub.add_parser("compare")
    p.add_argument("--npz", required=True)
    p.add_argument("--other", default=None)
    p.set_defaults(fn=cmd_compare)
    p = sub.add_parser("tokens")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=1000)
    p.add_argument("--lengths", default="100,37,64")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_tokens)
    p = sub.add_parser("fa3-check")
    p.add_argument("--nanochat", required=True)
    p.set_defaults(fn=cmd_fa3_check)
    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
