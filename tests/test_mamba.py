"""
Tests for the Mamba-2 mixer (nanochat/mamba.py). The CPU tests check the pure-PyTorch reference
path; the GPU tests (skipped without CUDA + mamba_ssm) compare it with mamba_ssm's kernels and
its Mamba2 module.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import nanochat.mamba as mamba
from nanochat.mamba import Mamba2Mixer, MambaState, ssd_chunked_scan, ssd_sequential_scan, HAVE_MAMBA_KERNELS
from nanochat.mamba import causal_conv


def expected_shapes(d_model, d_state, d_conv, expand, headdim, ngroups):
    """mamba_ssm Mamba2's parameter shapes (rmsnorm=True, bias=False, conv_bias=True, D_has_hdim=False)."""
    d_inner = expand * d_model
    nheads = d_inner // headdim
    conv_dim = d_inner + 2 * ngroups * d_state
    return {
        "in_proj.weight": (2 * d_inner + 2 * ngroups * d_state + nheads, d_model),
        "conv1d.weight": (conv_dim, 1, d_conv),
        "conv1d.bias": (conv_dim,),
        "dt_bias": (nheads,),
        "A_log": (nheads,),
        "D": (nheads,),
        "norm.weight": (d_inner,),
        "out_proj.weight": (d_model, d_inner),
    }


@pytest.mark.parametrize("cfg", [
    dict(d_model=64, d_state=16, d_conv=4, expand=2, headdim=16, ngroups=1),
    dict(d_model=96, d_state=32, d_conv=4, expand=2, headdim=24, ngroups=2),
    dict(d_model=128, d_state=64, d_conv=3, expand=1, headdim=32, ngroups=4),
])
def test_state_dict_layout(cfg):
    m = Mamba2Mixer(**cfg)
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert got == expected_shapes(**cfg)


def test_state_dict_layout_known_example():
    # worked example from mamba_ssm's formulas: d_model=64, d_state=16, headdim=16
    sd = Mamba2Mixer(64, d_state=16, headdim=16).state_dict()
    assert sd["in_proj.weight"].shape == (296, 64)
    assert sd["conv1d.weight"].shape == (160, 1, 4)
    assert sd["norm.weight"].shape == (128,)
    assert sd["dt_bias"].shape == sd["A_log"].shape == sd["D"].shape == (8,)


def check_init(m):
    dt = F.softplus(m.dt_bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    A = -torch.exp(m.A_log)
    assert A.min() >= -16 * (1 + 1e-6) and A.max() <= -1 * (1 - 1e-6)
    assert torch.all(m.D == 1) and torch.all(m.norm.weight == 1)
    for p in (m.dt_bias, m.A_log, m.D):
        assert getattr(p, "_no_weight_decay", False)
    # in/out_proj like nn.Linear's default init: uniform within 1/sqrt(fan_in)
    assert m.in_proj.weight.abs().max() <= 1 / math.sqrt(m.d_model)
    assert m.out_proj.weight.abs().max() <= 1 / math.sqrt(m.d_inner)


def test_init_ranges():
    torch.manual_seed(0)
    m = Mamba2Mixer(256, d_state=16, headdim=8)  # 64 heads: enough draws to see the ranges
    check_init(m)
    dt = F.softplus(m.dt_bias).log()  # log-uniform: spread over most of [log 1e-3, log 0.1]
    assert dt.min() < math.log(3e-3) and dt.max() > math.log(3e-2)


@pytest.mark.parametrize("ngroups", [1, 2])
def test_mimetic_init_statistics(ngroups):
    """Mimetic init (mamba.md): the documented decay, dt, C = B and conv ranges, with mamba_ssm's names and shapes."""
    torch.manual_seed(0)
    cfg = dict(d_model=256, d_state=16, headdim=8, ngroups=ngroups)   # 64 heads
    default, m = Mamba2Mixer(**cfg), Mamba2Mixer(**cfg, init="mimetic")
    assert {k: v.shape for k, v in m.state_dict().items()} == {k: v.shape for k, v in default.state_dict().items()}
    A, dt = -torch.exp(m.A_log), F.softplus(m.dt_bias)
    assert A.min() >= -1e-2 * (1 + 1e-5) and A.max() <= -1e-4 * (1 - 1e-5)
    assert -A.max() < 3e-4 and -A.min() > 3e-3   # log-uniform: a spread of horizons
    assert dt.min() >= 0.5 * (1 - 1e-5) and dt.max() <= 1.0 * (1 + 1e-5)
    assert torch.exp(dt * A).min() > 0.98   # the state barely decays per token (default init: down to ~0.2)
    for p in (m.dt_bias, m.A_log, m.D):
        assert getattr(p, "_no_weight_decay", False)
    # W_C W_B^T: large diagonal, ~0 off it (each C row is its B row); the rest of in_proj as default
    gn, b0, d = ngroups * 16, 2 * m.d_inner, m.d_inner
    W = m.in_proj.weight
    WB, WC = W[b0:b0 + gn], W[b0 + gn:b0 + 2 * gn]
    M = WC @ WB.T
    diag, off = M.diag().mean(), (M - torch.diag(M.diag())).abs().mean()
    assert diag > 10 * off, (diag, off)
    assert W.abs().max() <= 1 / math.sqrt(m.d_model)
    # conv on B and C near identity: current-token tap 1, bias 0, earlier taps within the default bound, C's = B's
    w = m.conv1d.weight
    assert torch.all(w[d:, 0, -1] == 1) and torch.all(m.conv1d.bias[d:] == 0)
    assert w[d:, 0, :-1].abs().max() <= 0.5 and torch.equal(w[d:d + gn], w[d + gn:])
    assert w[:d, 0, -1].abs().max() <= 0.5   # x channels keep the default init
    # so the SSM's B and C are equal at every token
    x = torch.randn(2, 20, 256)
    xBC = m.in_proj(x)[..., d:d + m.conv_dim]
    xBC = F.silu(causal_conv(xBC, m.conv1d.weight, m.conv1d.bias))
    assert torch.equal(xBC[..., d:d + gn], xBC[..., d + gn:])


def test_induction_init_shifts_b_by_one_token():
    """induction = mimetic with B's conv on the previous token and C's on the current one, so the SSM's
    B at token s equals its C at token s-1 (a query meets the key just before each value)."""
    torch.manual_seed(0)
    cfg = dict(d_model=64, d_state=16, headdim=8, ngroups=2)
    default, m = Mamba2Mixer(**cfg), Mamba2Mixer(**cfg, init="induction")
    assert {k: v.shape for k, v in m.state_dict().items()} == {k: v.shape for k, v in default.state_dict().items()}
    assert torch.exp(F.softplus(m.dt_bias) * -torch.exp(m.A_log)).min() > 0.98   # the mimetic decay
    d, gn = m.d_inner, 2 * 16
    w = m.conv1d.weight[:, 0]
    assert torch.equal(w[d:d + gn], torch.tensor([0., 0., 1., 0.]).expand(gn, 4))
    assert torch.equal(w[d + gn:], torch.tensor([0., 0., 0., 1.]).expand(gn, 4))
    assert w[:d, -1].abs().max() <= 0.5   # x channels keep the default init
    x = torch.randn(2, 20, 64)
    xBC = F.silu(causal_conv(m.in_proj(x)[..., d:d + m.conv_dim], m.conv1d.weight, m.conv1d.bias))
    B, C = xBC[..., d:d + gn], xBC[..., d + gn:]
    assert torch.equal(B[:, 1:], C[:, :-1]) and not torch.allclose(B, C)
    with pytest.raises(AssertionError, match="d_conv"):
        Mamba2Mixer(**cfg, d_conv=1, init="induction")


def test_mimetic_init_in_the_gpt():
    """config mamba_init reaches the mixers through the meta-device build, and init_weights keeps it."""
    from nanochat.gpt import GPT, config_from_depth
    config = config_from_depth(2, 64, 32, 32, 32, "TM", mamba_init="mimetic")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    mixer = model.transformer.h[1].mixer
    assert mixer.init == "mimetic" and -torch.exp(mixer.A_log).min() <= 1e-2
    assert torch.all(mixer.out_proj.weight == 0)   # the residual branch still starts as identity
    with pytest.raises(ValueError, match="mamba-init"):
        config_from_depth(2, 64, 32, 32, 32, "TM", mamba_init="mimic")


def test_init_after_meta_to_empty():
    # the GPT builds on the meta device, then to_empty() + init_weights(), which calls reset_parameters()
    with torch.device("meta"):
        m = Mamba2Mixer(256, d_state=16, headdim=8)
    m.to_empty(device="cpu")
    m.reset_parameters()
    check_init(m)


def random_scan_inputs(b=2, l=150, h=4, p=8, g=2, n=16, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen, dtype=dtype)
    dt = F.softplus(torch.randn(b, l, h, generator=gen, dtype=dtype) - 2)
    A = -torch.rand(h, generator=gen, dtype=dtype) * 4 - 0.5
    B = torch.randn(b, l, g, n, generator=gen, dtype=dtype)
    C = torch.randn(b, l, g, n, generator=gen, dtype=dtype)
    D = torch.randn(h, generator=gen, dtype=dtype)
    init = torch.randn(b, h, p, n, generator=gen, dtype=dtype)
    return x, dt, A, B, C, D, init


@pytest.mark.parametrize("with_seq_idx", [False, True])
def test_chunked_scan_equals_recurrence_fp64(with_seq_idx):
    """Outputs, final state and all gradients, L=150 not a multiple of the chunk (32), 2 groups."""
    inputs = [t.requires_grad_() for t in random_scan_inputs()]
    x, dt, A, B, C, D, init = inputs
    seq_idx = None
    if with_seq_idx:
        seq_idx = torch.zeros(2, 150, dtype=torch.long)
        seq_idx[0, 40:], seq_idx[0, 64:], seq_idx[0, 100:] = 1, 2, 3  # one boundary exactly on a chunk edge
        seq_idx[1, 7:] = 1
    gen = torch.Generator().manual_seed(1)
    wy = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    ws = torch.randn(init.shape, generator=gen, dtype=x.dtype)
    results = []
    for scan in (lambda: ssd_sequential_scan(x, dt, A, B, C, D, init, seq_idx),
                 lambda: ssd_chunked_scan(x, dt, A, B, C, 32, D, init, seq_idx)):
        y, final = scan()
        grads = torch.autograd.grad((y * wy).sum() + (final * ws).sum(), inputs)
        results.append((y, final, grads))
    (y1, f1, g1), (y2, f2, g2) = results
    torch.testing.assert_close(y2, y1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f2, f1, rtol=1e-10, atol=1e-10)
    for name, a, b in zip("x dt A B C D init".split(), g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"grad of {name}")


def test_chunked_scan_chunk_size_invariant():
    x, dt, A, B, C, D, init = random_scan_inputs(l=97)
    ref, fref = ssd_chunked_scan(x, dt, A, B, C, 97, D, init)  # one chunk: no inter-chunk step at all
    for Q in (1, 8, 16, 64, 128):
        y, f = ssd_chunked_scan(x, dt, A, B, C, Q, D, init)
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(f, fref, rtol=1e-10, atol=1e-10)


def test_chunked_scan_fp32_long_sequence():
    """fp32 accuracy over many chunks with fast-decaying heads (large cumulative decays)."""
    x, dt, A, B, C, D, init = random_scan_inputs(b=1, l=2000, h=2, p=4, g=1, n=8)
    A = A * 4
    y64, f64 = ssd_chunked_scan(x, dt, A, B, C, 64, D, init)
    y32, f32 = ssd_chunked_scan(*(t.float() for t in (x, dt, A, B, C)), 64, D.float(), init.float())
    assert (y32.double() - y64).abs().max() < 1e-4 * y64.abs().max()
    assert (f32.double() - f64).abs().max() < 1e-4 * f64.abs().max()


def test_causal_conv_matches_conv1d_and_gradcheck():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 11, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 1, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    init = torch.randn(2, 6, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    # nn.Conv1d(padding=w-1) semantics, i.e. mamba_ssm's conv1d, with the first outputs kept
    ref = F.conv1d(x.transpose(1, 2), w, bias, padding=3, groups=6)[..., :11].transpose(1, 2)
    torch.testing.assert_close(causal_conv(x, w, bias), ref)
    ref_init = F.conv1d(torch.cat([init, x.transpose(1, 2)], -1), w, bias, groups=6).transpose(1, 2)
    torch.testing.assert_close(causal_conv(x, w, bias, init), ref_init)
    seq_idx = torch.tensor([[0] * 5 + [1] * 6, [0] * 2 + [1] * 1 + [2] * 8])
    assert torch.autograd.gradcheck(lambda *a: causal_conv(*a, seq_idx=seq_idx), (x, w, bias, init))
    assert torch.autograd.gradcheck(lambda *a: causal_conv(*a), (x, w, bias))


def test_mixer_gradcheck_fp64():
    torch.manual_seed(0)
    m = Mamba2Mixer(8, d_state=4, headdim=4, ngroups=2, chunk_size=4).double()
    x = torch.randn(2, 10, 8, dtype=torch.float64, requires_grad=True)
    seq_idx = torch.tensor([[0] * 6 + [1] * 4, [0] * 10])
    assert torch.autograd.gradcheck(lambda x: m(x, seq_idx=seq_idx), (x,), fast_mode=True)
    # and the parameters whose gradients come from the hand-written parts (scan, conv)
    names = ["dt_bias", "A_log", "D", "conv1d.weight", "conv1d.bias", "norm.weight"]
    params = dict(m.named_parameters())
    def f(*ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x.detach(),), {"seq_idx": seq_idx})
    assert torch.autograd.gradcheck(f, [params[k].detach().clone().requires_grad_() for k in names], fast_mode=True)


# -----------------------------------------------------------------------------
# Mixer level


def make_mixer(ngroups=1, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(d_model=64, d_state=16, headdim=16, ngroups=ngroups, chunk_size=16)
    cfg.update(kw)
    m = Mamba2Mixer(**cfg)
    with torch.no_grad():  # move the dynamics away from their init so every parameter matters
        m.dt_bias.add_(torch.randn_like(m.dt_bias) * 0.5)
        m.D.add_(torch.randn_like(m.D) * 0.5)
        m.norm.weight.add_(torch.randn_like(m.norm.weight) * 0.1)
        m.conv1d.bias.add_(torch.randn_like(m.conv1d.bias) * 0.1)
    return m


@pytest.mark.parametrize("ngroups", [1, 2])
@torch.no_grad()
def test_prefill_then_steps_equals_forward(ngroups):
    m = make_mixer(ngroups)
    x = torch.randn(3, 45, 64)
    full = m(x)
    for pieces in ([20], [17, 9], [1, 2, 3]):  # a prompt, then "injected" chunks of tokens, then steps
        state = m.allocate_state(3, "cpu")
        outs, t = [], 0
        for n in pieces:
            outs.append(m(x[:, t:t + n], state=state))
            t += n
        while t < x.shape[1]:
            outs.append(m.step(x[:, t:t + 1], state))
            t += 1
        diff = (torch.cat(outs, dim=1) - full).abs().max().item()
        assert diff <= 1e-5, f"pieces {pieces}: max abs diff {diff}"


@torch.no_grad()
def test_steps_from_empty_state_equal_forward():
    m = make_mixer(2)
    x = torch.randn(2, 12, 64)
    state = m.allocate_state(2, "cpu")
    out = torch.cat([m.step(x[:, t:t + 1], state) for t in range(12)], dim=1)
    assert (out - m(x)).abs().max() <= 1e-5


@torch.no_grad()
def test_repeat_batch_and_index_select():
    """Engine pattern: prefill a batch-1 prompt, copy into n rows, decode different tokens per row."""
    m = make_mixer(1)
    prompt = torch.randn(1, 21, 64)
    cont = torch.randn(3, 6, 64)
    state = m.allocate_state(1, "cpu")
    m(prompt, state=state)
    rows = state.repeat_batch(3)
    assert isinstance(rows, MambaState) and rows.conv.shape[0] == rows.ssm.shape[0] == 3
    outs = torch.cat([m.step(cont[:, t:t + 1], rows) for t in range(6)], dim=1)
    for i in range(3):
        full = m(torch.cat([prompt, cont[i:i + 1]], dim=1))[:, 21:]
        assert (outs[i:i + 1] - full).abs().max() <= 1e-5
    kept = rows.index_select([2, 0])
    assert torch.equal(kept.ssm[0], rows.ssm[2]) and torch.equal(kept.conv[1], rows.conv[0])
    assert kept.ssm.dtype == torch.float32


@pytest.mark.parametrize("ngroups", [1, 2])
@torch.no_grad()
def test_packed_seq_idx_equals_separate_runs(ngroups):
    m = make_mixer(ngroups)
    lens = [[13, 40, 3, 24], [16, 16, 48]]  # second row: documents start on chunk edges
    docs = [[torch.randn(1, n, 64) for n in row] for row in lens]
    x = torch.stack([torch.cat(row, dim=1)[0] for row in docs])  # (2, 80, 64)
    seq_idx = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in lens])
    packed = m(x, seq_idx=seq_idx)
    for r, row in enumerate(docs):
        separate = torch.cat([m(d) for d in row], dim=1)[0]
        assert (packed[r] - separate).abs().max() <= 1e-5
    assert (m(x) - packed).abs().max() > 1e-3  # without seq_idx, state does leak across documents


@torch.no_grad()
def test_prefill_with_seq_idx_continues_last_document():
    m = make_mixer(1)
    a, b, c = torch.randn(1, 10, 64), torch.randn(1, 7, 64), torch.randn(1, 5, 64)
    state = m.allocate_state(1, "cpu")
    seq_idx = torch.tensor([[0] * 10 + [1] * 7])
    m(torch.cat([a, b], dim=1), seq_idx=seq_idx, state=state)
    outs = torch.cat([m.step(c[:, t:t + 1], state) for t in range(5)], dim=1)
    ref = m(torch.cat([b, c], dim=1))[:, 7:]  # document "b" alone, then c
    assert (outs - ref).abs().max() <= 1e-5


def test_backward_reaches_every_parameter():
    m = make_mixer(2)
    x = torch.randn(2, 40, 64, requires_grad=True)
    seq_idx = torch.tensor([[0] * 25 + [1] * 15, [0] * 40])
    m(x, seq_idx=seq_idx).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all()


@torch.no_grad()
def test_low_precision_activations():
    """bf16 activations with fp32 weights (no autocast) run and stay close to fp32."""
    m = make_mixer(1)
    x = torch.randn(2, 33, 64)
    y32 = m(x)
    y16 = m(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    assert (y16.float() - y32).abs().max() < 0.1 * y32.abs().max()
    state = m.allocate_state(2, "cpu", dtype=torch.bfloat16)
    assert state.ssm.dtype == torch.float32
    m.step(x[:, :1].bfloat16(), state)


# -----------------------------------------------------------------------------
# GPU: mamba_ssm kernels vs the reference path, and weight round trips with mamba_ssm.Mamba2

gpu = pytest.mark.skipif(not (torch.cuda.is_available() and HAVE_MAMBA_KERNELS), reason="needs CUDA and mamba_ssm")


def run_path(m, reference, fn):
    old = mamba.FORCE_REFERENCE
    mamba.FORCE_REFERENCE = reference
    try:
        return fn()
    finally:
        mamba.FORCE_REFERENCE = old


def assert_rel_close(a, b, tol, what=""):
    """Relative error in norm: the kernels use TF32 matmuls, so compare in aggregate, not per element."""
    err = ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()
    assert err < tol, f"{what}: relative error {err:.2e} >= {tol}"


@gpu
@pytest.mark.parametrize("ngroups", [1, 2])
def test_gpu_kernels_match_reference(ngroups):
    m = make_mixer(ngroups, d_model=128, d_state=64, headdim=32, chunk_size=64).cuda()
    x = torch.randn(2, 300, 128, device="cuda")
    seq_idx = torch.tensor([[0] * 120 + [1] * 180, [0] * 300], device="cuda")
    results = []
    for reference in (True, False):
        def fwd_bwd():
            m.zero_grad()
            xx = x.clone().requires_grad_()
            y = m(xx, seq_idx=seq_idx)
            y.square().mean().backward()
            return y.detach(), xx.grad, {k: p.grad.clone() for k, p in m.named_parameters()}
        results.append(run_path(m, reference, fwd_bwd))
    (y_ref, gx_ref, gp_ref), (y_k, gx_k, gp_k) = results
    assert_rel_close(y_k, y_ref, 5e-3, "output")
    assert_rel_close(gx_k, gx_ref, 1e-2, "grad x")
    for k in gp_ref:
        assert_rel_close(gp_k[k], gp_ref[k], 2e-2, f"grad {k}")
    # generation: prefill + steps on the kernel path equals the reference forward
    with torch.no_grad():
        state = m.allocate_state(2, "cuda")
        outs = run_path(m, False, lambda: [m(x[:, :200], state=state)] + [m.step(x[:, t:t + 1], state) for t in range(200, 230)])
        ref = run_path(m, True, lambda: m(x[:, :230]))
    assert_rel_close(torch.cat(outs, dim=1), ref, 5e-3, "prefill + steps")


@gpu
def test_gpu_weights_round_trip_with_mamba_ssm():
    pytest.importorskip("causal_conv1d")  # mamba_ssm's Mamba2.forward needs it (fused path and its fallback)
    from mamba_ssm.modules.mamba2 import Mamba2
    cfg = dict(d_model=128, d_state=64, headdim=32, ngroups=2, chunk_size=64)
    ours = make_mixer(**cfg).cuda()
    theirs = Mamba2(**cfg).cuda()
    assert {k: v.shape for k, v in theirs.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 200, 128, device="cuda")
    with torch.no_grad():
        y_theirs = theirs(x)
        assert_rel_close(run_path(ours, False, lambda: ours(x)), y_theirs, 5e-3, "ours (kernels) vs mamba_ssm")
        assert_rel_close(run_path(ours, True, lambda: ours(x)), y_theirs, 5e-3, "ours (reference) vs mamba_ssm")
    # and back: a freshly initialised mamba_ssm module loads into ours and gives the same outputs
    theirs2 = Mamba2(**cfg).cuda()
    ours.load_state_dict(theirs2.state_dict())
    with torch.no_grad():
        assert_rel_close(run_path(ours, True, lambda: ours(x)), theirs2(x), 5e-3, "mamba_ssm init loaded into ours")


def test_muon_orthogonalises_in_proj_blocks_separately():
    """Muon's step on in_proj equals five separate Muon steps, one per row block (z, x, B, C, dt),
    each scaled as its own matrix, and differs from one joint step on the whole matrix."""
    from nanochat.optim import Muon, zeropower_via_newtonschulz5
    torch.manual_seed(0)
    m = Mamba2Mixer(d_model=32, d_state=8, headdim=8)
    W = m.in_proj.weight
    assert W._muon_splits == [64, 64, 8, 8, 8] and sum(W._muon_splits) == W.size(0)
    before = W.detach().clone()
    W.grad = torch.randn_like(W)
    Muon([W], lr=0.1, momentum=0.0, nesterov=False).step()
    expected = torch.cat([zeropower_via_newtonschulz5(g) * max(1.0, g.size(0) / g.size(1)) ** 0.5
                          for g in W.grad.split(W._muon_splits)])
    assert torch.allclose(before - W.detach(), 0.1 * expected, atol=1e-6)
    joint = zeropower_via_newtonschulz5(W.grad) * (W.size(0) / W.size(1)) ** 0.5
    assert not torch.allclose(expected, joint, atol=1e-2)
