"""
Mamba-2 mixer (the "M" block's sequence mixer), written in plain PyTorch so it trains on a CPU,
with mamba_ssm's Triton kernels used automatically on CUDA when they import.

The parameters have exactly the names and shapes of mamba_ssm.modules.mamba2.Mamba2 with
rmsnorm=True, norm_before_gate=False, bias=False, conv_bias=True, D_has_hdim=False, so a
state_dict moves between the two modules unchanged:

    in_proj.weight   (2*d_inner + 2*ngroups*d_state + nheads, d_model)   rows split [z | xBC | dt]
    conv1d.weight    (conv_dim, 1, d_conv)   depthwise causal conv over xBC, conv_dim = d_inner + 2*ngroups*d_state
    conv1d.bias      (conv_dim,)
    dt_bias, A_log, D (nheads,)
    norm.weight      (d_inner,)              gated group RMSNorm: rmsnorm_group(y * silu(z)) * w
    out_proj.weight  (d_model, d_inner)

Per head h (headdim P, state size N), with x, B, C coming out of the conv:
    dt = softplus(dt_raw + dt_bias),  A = -exp(A_log)
    S_t = exp(dt*A) * S_{t-1} + dt * x_t B_t^T        S: (P, N), kept in fp32
    y_t = S_t C_t + D * x_t
Heads are split into ngroups groups of consecutive heads that share B and C.

Training runs the whole sequence at once with the chunked "SSD" form of that recurrence
(ssd_chunked_scan): quadratic attention-like work inside chunks of ~64 tokens, a small linear
recurrence between chunks. Generation runs the recurrence one token at a time (Mamba2Mixer.step).
"""

import os
import sys
import math
import types
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_window(state, x, lengths=None):
    """The last w inputs after feeding x (B, T, C) to a conv whose window was state (B, C, w):
    with lengths, the w columns that end at row b's last real token (right padding ignored)."""
    B, C, w = state.shape
    cols = torch.cat([state, x.transpose(1, 2).to(state.dtype)], dim=-1)
    if lengths is None:
        return cols[:, :, -w:]
    idx = lengths.to(x.device)[:, None] + torch.arange(w, device=x.device)
    return cols.gather(2, idx[:, None, :].expand(B, C, w))


# -----------------------------------------------------------------------------
# Optional CUDA kernels (pip install ".[gpu]", see README). Never needed for correctness.

# NANOCHAT_MAMBA_REFERENCE=1 forces the pure-PyTorch path everywhere; tests flip the flag directly.
FORCE_REFERENCE = os.environ.get("NANOCHAT_MAMBA_REFERENCE", "0") == "1"


def _import_mamba_kernels():
    """Returns (chunk_scan, state_update, rmsnorm, conv1d) from mamba_ssm/causal_conv1d, or None."""
    try:
        import mamba_ssm  # noqa: F401
    except ImportError as e:
        if "selective_scan_cuda" not in str(e):
            return None
        # mamba-ssm <= 2.3.2 imports its Mamba-1 CUDA extension unconditionally from __init__, and
        # that extension is not built by the MAMBA_SKIP_CUDA_BUILD install we document. We only use
        # the Triton kernels, so an empty stand-in module is enough to get past the import.
        sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
    except Exception:
        return None
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:
        causal_conv1d_fn = None  # optional: the pure-PyTorch conv below is used instead
    return mamba_chunk_scan_combined, selective_state_update, rmsnorm_fn, causal_conv1d_fn


# The Triton kernels run on CUDA only, and importing mamba_ssm costs ~10 s, so CPU boxes skip it.
_kernels = _import_mamba_kernels() if torch.cuda.is_available() else None
HAVE_MAMBA_KERNELS = _kernels is not None
mamba_chunk_scan_combined, selective_state_update, rmsnorm_fn, causal_conv1d_fn = _kernels or (None,) * 4

# -----------------------------------------------------------------------------
# Reference (pure PyTorch) building blocks


def _f32(t):
    """Upcast to fp32 for the numerically sensitive parts; fp64 stays fp64 (the exactness tests use it)."""
    return t if t.dtype == torch.float64 else t.float()


def ssd_sequential_scan(x, dt, A, B, C, D=None, initial_states=None, seq_idx=None):
    """
    The SSM recurrence one token at a time: the definition the chunked scan must match, and the
    baseline of the benchmark. Too slow to train with (a Python loop over tokens).
    x (b, l, h, p), dt (b, l, h) positive step sizes (softplus already applied), A (h) negative,
    B and C (b, l, g, n), D (h) or None, initial_states (b, h, p, n) or None,
    seq_idx (b, l) int document ids: the state is reset where the id changes.
    Returns y (b, l, h, p) in x's dtype and the final state (b, h, p, n) in fp32 (fp64 for fp64 inputs).
    """
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    dtype = torch.promote_types(x.dtype, torch.float32)
    xf, dt = x.to(dtype), dt.to(dtype)
    B = B.to(dtype).repeat_interleave(h // g, dim=2)  # (b, l, h, n): group k serves heads k*h/g ... (k+1)*h/g-1
    C = C.to(dtype).repeat_interleave(h // g, dim=2)
    dA = torch.exp(dt * A.to(dtype))  # (b, l, h)
    xdt = xf * dt[..., None]
    S = torch.zeros(b, h, p, n, device=x.device, dtype=dtype) if initial_states is None else initial_states.to(dtype)
    ys = []
    for t in range(l):
        if seq_idx is not None and t > 0:
            S = S * (seq_idx[:, t] == seq_idx[:, t - 1]).to(dtype).view(b, 1, 1, 1)
        S = S * dA[:, t, :, None, None] + xdt[:, t, :, :, None] * B[:, t, :, None, :]
        ys.append((S @ C[:, t, :, :, None]).squeeze(-1))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + xf * D.to(dtype)[:, None]
    return y.to(x.dtype), S


def _segsum_exp(a, mask):
    """
    W[..., i, j] = exp(a[..., j] + ... + a[..., i-1]) for j <= i where mask allows it, else 0.
    Sums are accumulated per (i, j) pair rather than as differences of one long cumsum, so the
    result stays accurate when the total decay over a long sequence is huge.
    a (..., T) -> W (..., T+1, T+1)
    """
    T = a.shape[-1]
    rows = a[..., None, :].expand(*a.shape[:-1], T + 1, T)  # rows[..., i, k] = a[k]
    keep = torch.ones(T + 1, T, dtype=torch.bool, device=a.device).tril(-1)  # only k < i contributes to row i
    rows = rows.masked_fill(~keep, 0.0)
    seg = rows.flip(-1).cumsum(-1).flip(-1)  # seg[..., i, j] = sum_{k >= j, k < i} a[k]
    seg = F.pad(seg, (0, 1))  # column j = T: empty sum
    return torch.exp(torch.where(mask, seg, float("-inf")))


def ssd_chunked_scan(x, dt, A, B, C, chunk_size=64, D=None, initial_states=None, seq_idx=None):
    """
    Same contract as ssd_sequential_scan (see there), computed chunk by chunk with matmuls:
      1. inside each chunk: y = (decay-masked C B^T) @ (dt*x), like causal attention;
      2. each chunk's own end state = sum over its tokens of decay-to-end * (dt*x) B^T;
      3. states at all chunk boundaries: a (nchunks+1)^2 decay matrix times the chunk states
         (one matmul instead of a Python loop over chunks; nchunks is small);
      4. y += C @ (state entering the chunk), decayed to each token.
    seq_idx: the initial state belongs to each row's first document (ids must not reappear later).

    Layout: heads are (g, r) = (group, head within group). Steps 2 and 4 keep the r heads of a
    group side by side in the matmul's columns, so the group's shared B and C are used once instead
    of being copied per head; steps 1 and 3 need one head per batch entry. Choosing the layout per
    step made the scan 20-30% faster on CPU than one layout throughout (the cost is memory traffic).
    """
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    out_dtype = x.dtype
    dtype = torch.promote_types(x.dtype, torch.float32)  # the scan is always done in >= fp32
    Q = min(chunk_size, l)  # a short input is one chunk, not one padded chunk
    pad = (-l) % Q
    if pad:
        # zero padding at the end: dt = 0 means no decay and no input, so earlier outputs and
        # the final state are unchanged; the padded outputs are cut off below
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
        if seq_idx is not None:
            seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(b, pad)], dim=1)
    c = (l + pad) // Q

    # heads-inner layout (b, g, c, Q, r, ...): the inputs' own layout with g moved first (free when g == 1)
    x = x.to(dtype).view(b, c, Q, g, r, p).permute(0, 3, 1, 2, 4, 5)
    dt = dt.to(dtype).view(b, c, Q, g, r).permute(0, 3, 1, 2, 4)
    B = B.to(dtype).view(b, c, Q, g, n).permute(0, 3, 1, 2, 4)  # (b, g, c, Q, n)
    C = C.to(dtype).view(b, c, Q, g, n).permute(0, 3, 1, 2, 4)
    cs = (dt * A.to(dtype).view(g, 1, 1, r)).cumsum(3)  # (b, g, c, Q, r) log decay since the chunk start, <= 0
    xdt = x * dt[..., None]  # (b, g, c, Q, r, p)
    if seq_idx is not None:
        sid = seq_idx.view(b, 1, c, Q)

    # 1. within chunks, one head per batch entry: (b, g, r, c, Q, Q) decays.
    # Differences of the in-chunk cumsum are accurate enough: a chunk is short. (cs + (-cs) rather
    # than cs - cs, and where() rather than masked_fill(): each saves a pass over this big tensor
    # in the backward.)
    csT = cs.permute(0, 1, 4, 2, 3).contiguous()  # (b, g, r, c, Q)
    same_doc = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    if seq_idx is not None:
        same_doc = ((sid[..., :, None] == sid[..., None, :]) & same_doc).unsqueeze(2)  # (b, 1, 1, c, Q, Q)
    seg = csT[..., :, None] + (-csT)[..., None, :]
    decay = torch.exp(torch.where(same_doc, seg, float("-inf")))
    CB = (C @ B.transpose(-1, -2)).unsqueeze(2)  # (b, g, 1, c, Q, Q), shared by the group's heads
    y_diag = (decay * CB) @ xdt.permute(0, 1, 4, 2, 3, 5)  # (b, g, r, c, Q, p)

    # 2. each chunk's contribution to the state at its end: B^T @ (tokens x (r p))
    decay_to_end = torch.exp(cs[:, :, :, -1:] - cs)  # (b, g, c, Q, r)
    if seq_idx is not None:  # only the document the chunk ends in carries on
        decay_to_end = decay_to_end * (sid == sid[..., -1:]).unsqueeze(-1)
    states = B.transpose(-1, -2) @ (xdt * decay_to_end[..., None]).reshape(b, g, c, Q, r * p)
    states = states.view(b, g, c, n, r, p).permute(0, 1, 4, 2, 3, 5)  # (b, g, r, c, n, p)

    # 3. states at every chunk boundary. Index 0 is the initial state, index i the state after chunk i-1.
    if initial_states is None:
        init = torch.zeros(b, g, r, 1, n, p, device=x.device, dtype=dtype)
    else:
        init = initial_states.to(dtype).view(b, g, r, 1, p, n).transpose(-1, -2)
    states = torch.cat([init, states], dim=3)  # (b, g, r, c+1, n, p)
    chunk_mask = torch.ones(c + 1, c + 1, dtype=torch.bool, device=x.device).tril()
    if seq_idx is not None:
        # a boundary state belongs to the document of the token just before it; state flows
        # between two boundaries only if no document starts in between (ids are contiguous)
        sid_end = torch.cat([seq_idx[:, :1], seq_idx.view(b, c, Q)[:, :, -1]], dim=1)  # (b, c+1)
        chunk_mask = ((sid_end[:, :, None] == sid_end[:, None, :]) & chunk_mask).view(b, 1, 1, c + 1, c + 1)
    W = _segsum_exp(csT[..., -1], chunk_mask)  # (b, g, r, c+1, c+1) decay between boundaries
    states = (W @ states.flatten(-2)).view(b, g, r, c + 1, n, p)
    final_state = states[:, :, :, -1].transpose(-1, -2).reshape(b, h, p, n)

    # 4. the state entering each chunk, read out by C and decayed to each token: C @ (n x (r p))
    S_in = states[:, :, :, :-1].permute(0, 1, 3, 4, 2, 5).reshape(b, g, c, n, r * p)
    decay_from_start = torch.exp(cs)  # (b, g, c, Q, r)
    if seq_idx is not None:
        decay_from_start = decay_from_start * (sid == sid_end[:, :-1].view(b, 1, c, 1)).unsqueeze(-1)
    y = (C @ S_in).view(b, g, c, Q, r, p) * decay_from_start[..., None] + y_diag.permute(0, 1, 3, 4, 2, 5)

    if D is not None:
        y = y + x * D.to(dtype).view(g, 1, 1, r, 1)
    y = y.permute(0, 2, 3, 1, 4, 5).reshape(b, c * Q, h, p)[:, :l]  # back to (b, l, h, p); a view when g == 1
    return y.to(out_dtype), final_state


class _CausalConvFn(torch.autograd.Function):
    """
    out[:, t] = bias + sum_k taps[k] * masks[k][:, t] * xp[:, t + k], over a left-padded input xp.
    The backward is written by hand because autograd's version of the shifted slices allocates and
    zero-fills a padded gradient buffer per tap, which made the conv ~2x slower on CPU.
    """

    @staticmethod
    def forward(ctx, xp, taps, bias, masks):
        w = taps.shape[0]
        l = xp.shape[1] - w + 1
        out = torch.addcmul(bias, xp[:, w - 1:], taps[w - 1])  # the last tap reads the current token
        for k in range(w - 1):
            xk = xp[:, k:k + l] if masks is None else xp[:, k:k + l] * masks[k]
            out.addcmul_(xk, taps[k])
        ctx.save_for_backward(xp, taps, masks)
        return out

    @staticmethod
    def backward(ctx, grad):
        xp, taps, masks = ctx.saved_tensors
        w = taps.shape[0]
        l = xp.shape[1] - w + 1
        grad_xp, grad_taps = torch.zeros_like(xp), torch.empty_like(taps)
        for k in range(w):
            gk = grad if (masks is None or k == w - 1) else grad * masks[k]
            grad_xp[:, k:k + l].addcmul_(gk, taps[k])
            grad_taps[k] = (gk * xp[:, k:k + l]).sum((0, 1))
        return grad_xp, grad_taps, grad.sum((0, 1)), None


def causal_conv(x, weight, bias, initial=None, seq_idx=None):
    """
    Depthwise causal conv along time, channel-last: x (b, l, d), weight (d, 1, w), bias (d,).
    initial (b, d, w-1): the inputs that precede x (a continued prefill); zeros if None.
    seq_idx (b, l): a tap never reads a token of another document (the initial columns belong to
    the first one). Written as w shifted multiply-adds: cheaper on CPU than a grouped conv1d and
    its transposes.
    """
    b, l, d = x.shape
    w = weight.shape[-1]
    taps = weight.to(x.dtype).view(d, w).t().contiguous()  # (w, d): contiguous rows broadcast fast
    if initial is None:
        xp = F.pad(x, (0, 0, w - 1, 0))
    else:
        xp = torch.cat([initial.transpose(1, 2).to(x.dtype), x], dim=1)  # (b, l+w-1, d)
    masks = None
    if seq_idx is not None:  # masks[k]: 1 where tap k (w-1-k tokens back) stays in the same document
        sp = torch.cat([seq_idx[:, :1].expand(b, w - 1), seq_idx], dim=1)
        masks = torch.stack([sp[:, k:k + l] == seq_idx for k in range(w - 1)]).unsqueeze(-1).to(x.dtype)
    return _CausalConvFn.apply(xp, taps, bias.to(x.dtype), masks)


def gated_rmsnorm(y, z, weight, ngroups, eps=1e-5):
    """mamba_ssm's RMSNormGated with norm_before_gate=False: rmsnorm(y * silu(z)) per group of channels, times weight."""
    dtype = y.dtype
    y = _f32(y) * F.silu(_f32(z))
    yg = y.view(*y.shape[:-1], ngroups, y.shape[-1] // ngroups)
    yg = yg * torch.rsqrt((yg * yg).mean(-1, keepdim=True) + eps)
    return (yg.view_as(y) * _f32(weight)).to(dtype)

# -----------------------------------------------------------------------------
# Generation state


@dataclass
class MambaState:
    """Per-layer generation state. conv: the last d_conv pre-conv xBC columns (b, conv_dim, d_conv);
    ssm: (b, nheads, headdim, d_state), always fp32. Both are updated in place by the mixer."""
    conv: torch.Tensor
    ssm: torch.Tensor

    def repeat_batch(self, n):
        """Each row repeated n times (row i -> rows i*n .. i*n+n-1), e.g. a batch-1 prefill -> n samples."""
        return MambaState(self.conv.repeat_interleave(n, dim=0), self.ssm.repeat_interleave(n, dim=0))

    def index_select(self, rows):
        """Keep only the given rows (e.g. drop finished samples); rows: list or 1-D index tensor."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.conv.device)
        return MambaState(self.conv.index_select(0, rows), self.ssm.index_select(0, rows))

    def clone(self):
        return MambaState(self.conv.clone(), self.ssm.clone())

# -----------------------------------------------------------------------------
# The mixer


MAMBA_INITS = ("default", "mimetic", "induction")   # reset_parameters: mamba_ssm's, + mimetic_init_, + its B shift


class Mamba2Mixer(nn.Module):

    def __init__(self, d_model, d_state=64, d_conv=4, expand=2, headdim=32, ngroups=1, chunk_size=64, layer_idx=None,
                 init="default"):
        super().__init__()
        assert init in MAMBA_INITS, f"init must be one of {', '.join(MAMBA_INITS)}, got {init!r}"
        assert init != "induction" or d_conv >= 2, "the induction init shifts B by one token: it needs d_conv >= 2"
        self.init = init  # what reset_parameters does: mamba_ssm's init, or that plus mimetic_init_
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        assert self.d_inner % headdim == 0, f"expand*d_model={self.d_inner} must be a multiple of headdim={headdim}"
        self.headdim = headdim
        self.nheads = self.d_inner // headdim
        assert self.nheads % ngroups == 0, f"nheads={self.nheads} must be a multiple of ngroups={ngroups}"
        self.ngroups = ngroups
        self.chunk_size = chunk_size  # ~64 is fastest for the CPU reference; mamba_ssm defaults to 256 on GPU
        self.layer_idx = layer_idx
        self.conv_dim = self.d_inner + 2 * ngroups * d_state
        # same modules, names and shapes as mamba_ssm's Mamba2 (see the module docstring)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * ngroups * d_state + self.nheads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.empty(self.nheads))
        self.norm = nn.Module()  # only holds norm.weight; the gated group RMSNorm is gated_rmsnorm()
        self.norm.weight = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        if self.D.device.type == "meta":   # shapes only (GPT on the meta device): init_weights or a checkpoint sets the
            self._mark_parameters()        # values, and init on meta tensors would import torch._dynamo (see GPT.__init__)
        else:
            self.reset_parameters()

    def _mark_parameters(self):
        # the optimizer reads this: no weight decay on the SSM dynamics. Set in __init__ and again on
        # every reset, because moving parameters off the meta device can create new Parameter objects.
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.dt_bias._no_reinit = True
        # Muon orthogonalises in_proj's row blocks one at a time (z, x, B, C, dt: five projections in
        # one matrix, as attention's q, k, v are three); jointly, the blocks' updates are coupled
        gn = self.ngroups * self.d_state
        self.in_proj.weight._muon_splits = [self.d_inner, self.d_inner, gn, gn, self.nheads]

    def reset_parameters(self, dt_min=1e-3, dt_max=0.1, dt_init_floor=1e-4, A_init_range=(1, 16)):
        """mamba_ssm's init (then mimetic_init_ if self.init == "mimetic"). Also safe after to_empty()
        from the meta device."""
        self._mark_parameters()
        with torch.no_grad():
            self.in_proj.reset_parameters()
            self.conv1d.reset_parameters()
            self.out_proj.reset_parameters()
            # dt log-uniform in [dt_min, dt_max]; dt_bias is its inverse softplus so softplus(dt_bias) = dt
            device = self.dt_bias.device
            dt = torch.exp(torch.rand(self.nheads, device=device) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_init_floor)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            self.A_log.copy_(torch.empty(self.nheads, device=device).uniform_(*A_init_range).log())
            self.D.fill_(1.0)
            self.norm.weight.fill_(1.0)
        if self.init != "default":
            self.mimetic_init_(shift_b=self.init == "induction")

    @torch.no_grad()
    def mimetic_init_(self, A_range=(1e-4, 1e-2), dt_range=(0.5, 1.0), shift_b=False):
        """
        Mimetic initialisation (Trockman et al. 2024, "Mimetic Initialization Helps State Space Models
        Learn to Recall"): start the SSM close to linear attention with W_Q W_K^T ~ I, the form in which
        attention learns recall easily. Only values change; names and shapes stay mamba_ssm's.
        - decay ~ 1: A log-uniform in A_range and dt = softplus(dt_bias) uniform in dt_range, so the
          per-token log-decay dt*A is 5e-5 ... 1e-2 (default init: 1e-3 ... 1.6, most heads forget within a few hundred tokens);
          heads keep a spread of horizons, from ~100 tokens to the whole context;
        - C = B: the C rows of in_proj are copies of the B rows, so W_C W_B^T = W_B W_B^T has a positive
          diagonal and C_t . B_s is largest for tokens s like t (the query finds its own key);
        - the conv near identity on B and C: weight 1 on the current token, bias 0, the default random
          taps on the tokens before it, and C's taps copies of B's, so C = B holds after the conv too
          (C_t . B_s then compares the windows ending at t and s, the current token foremost). On the
          recall probe (bench/bench_recall.py) exact identity taps ([0, 0, 0, 1]) learned about half as
          much: the earlier taps let B carry some of the previous token (the key before a value).
        shift_b (init "induction", our variant, not the paper's): B's conv reads only the previous token
        and C's only the current one (taps [0, 0, 1, 0] and [0, 0, 0, 1]), so C_t . B_s is largest when
        token t equals token s-1 and the state returns x_s, the token that followed an earlier copy of
        the current one: an induction head (key, then value) in one layer. On the probe it learns
        recall at every LR where mimetic learns it partly and in a ragged window (docs/mamba.md).
        """
        device = self.A_log.device
        lo, hi = math.log(A_range[0]), math.log(A_range[1])
        self.A_log.copy_(torch.rand(self.nheads, device=device) * (hi - lo) + lo)
        dt = torch.empty(self.nheads, device=device).uniform_(*dt_range)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        gn = self.ngroups * self.d_state
        b0 = 2 * self.d_inner  # in_proj rows: [z (d_inner) | x (d_inner) | B (gn) | C (gn) | dt (nheads)]
        W = self.in_proj.weight
        W[b0 + gn:b0 + 2 * gn] = W[b0:b0 + gn]
        cb, cc = slice(self.d_inner, self.d_inner + gn), slice(self.d_inner + gn, self.conv_dim)  # conv: [x | B | C]
        self.conv1d.weight[cb, :, -1] = 1.0
        self.conv1d.weight[cc] = self.conv1d.weight[cb]
        self.conv1d.bias[cb] = 0.0
        self.conv1d.bias[cc] = 0.0
        if shift_b:
            self.conv1d.weight[cb] = 0.0
            self.conv1d.weight[cb, :, -2] = 1.0
            self.conv1d.weight[cc] = 0.0
            self.conv1d.weight[cc, :, -1] = 1.0

    def allocate_state(self, batch_size, device, dtype=torch.float32):
        conv = torch.zeros(batch_size, self.conv_dim, self.d_conv, device=device, dtype=dtype)
        ssm = torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device, dtype=torch.float32)
        return MambaState(conv, ssm)

    def _use_kernels(self, x):
        return HAVE_MAMBA_KERNELS and x.is_cuda and not FORCE_REFERENCE

    def _norm_out(self, y, z, kernels):
        if kernels:
            y = rmsnorm_fn(y, self.norm.weight, None, z=z, eps=1e-5, group_size=self.d_inner // self.ngroups, norm_before_gate=False)
        else:
            y = gated_rmsnorm(y, z, self.norm.weight, self.ngroups)
        # weights are cast to the activations' dtype so the mixer works with low-precision
        # activations and fp32 master weights, with or without autocast
        return F.linear(y, self.out_proj.weight.to(y.dtype))

    def forward(self, x, seq_idx=None, state=None, lengths=None):
        """
        x (b, l, d_model) -> (b, l, d_model).
        seq_idx (b, l) int: document id of each token of a packed row (starting at 0 in each row,
        contiguous); neither the conv nor the SSM state crosses a change of id.
        state: a MambaState to continue from (prefill, possibly a later piece of one); it is
        updated in place to the state after the last token, of the row's last document.
        lengths (b,), with state: row b has only lengths[b] real tokens, the rest is padding; its
        state is left as it was after its last real token (the outputs at padding are garbage).
        """
        b, l, _ = x.shape
        if state is not None and l == 1:
            return self.step(x, state)  # same result, without the chunked scan's overhead
        kernels = self._use_kernels(x)
        zxbcdt = F.linear(x, self.in_proj.weight.to(x.dtype))
        z, xBC, dt = torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        A = -torch.exp(_f32(self.A_log))  # exp of a low-precision A_log can overflow
        if lengths is not None:
            # a step with dt = softplus(-1e4) = 0 neither decays nor writes the state: padding is a no-op
            pad = torch.arange(l, device=x.device)[None, :] >= lengths.to(x.device)[:, None]
            dt = dt.masked_fill(pad.unsqueeze(-1), -1e4)

        if state is not None:
            # the conv state after this call: the last d_conv inputs, counting the old state's columns
            cols = conv_window(state.conv, xBC, lengths)
            if seq_idx is not None:  # columns of an earlier document must not leak into the next step
                sid = torch.cat([seq_idx[:, :1].expand(b, self.d_conv), seq_idx], dim=1)[:, -self.d_conv:]
                cols = cols * (sid == seq_idx[:, -1:]).unsqueeze(1).to(cols.dtype)
        if kernels and causal_conv1d_fn is not None and state is None:
            # (b, l, d).transpose is channel-last in memory, the layout causal_conv1d needs for seq_idx
            sidx = seq_idx.to(torch.int32) if seq_idx is not None else None
            xBC = causal_conv1d_fn(xBC.transpose(1, 2), self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                   seq_idx=sidx, activation="silu").transpose(1, 2)
        else:
            initial = state.conv[:, :, 1:] if state is not None else None
            xBC = F.silu(causal_conv(xBC, self.conv1d.weight, self.conv1d.bias, initial, seq_idx))
        if state is not None:
            state.conv.copy_(cols)
        xs, B, C = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        xs = xs.reshape(b, l, self.nheads, self.headdim)
        B = B.reshape(b, l, self.ngroups, self.d_state)
        C = C.reshape(b, l, self.ngroups, self.d_state)
        initial_states = state.ssm if state is not None else None

        if kernels:
            out = mamba_chunk_scan_combined(xs, dt, A, B, C, chunk_size=self.chunk_size, D=self.D,
                                            dt_bias=self.dt_bias, dt_softplus=True, initial_states=initial_states,
                                            seq_idx=seq_idx.to(torch.int32) if seq_idx is not None else None,
                                            return_final_states=state is not None)
            y, final_state = out if state is not None else (out, None)
        else:
            dt = F.softplus(_f32(dt) + _f32(self.dt_bias))
            y, final_state = ssd_chunked_scan(xs, dt, A, B, C, self.chunk_size, D=self.D,
                                              initial_states=initial_states, seq_idx=seq_idx)
        if state is not None:
            state.ssm.copy_(final_state.detach())
        return self._norm_out(y.reshape(b, l, self.d_inner), z, kernels)

    def step(self, x, state):
        """One token: x (b, 1, d_model) -> (b, 1, d_model); state is updated in place."""
        b = x.shape[0]
        kernels = self._use_kernels(x)
        zxbcdt = F.linear(x[:, 0], self.in_proj.weight.to(x.dtype))
        z, xBC, dt = torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)

        # conv: shift the window left by one, append the new column, dot with the kernel.
        # (Plain torch on every device: it is tiny, and causal_conv1d_update wants matching dtypes.)
        conv = state.conv
        conv[:, :, :-1] = conv[:, :, 1:].clone()
        conv[:, :, -1] = xBC.to(conv.dtype)
        xBC = (conv * self.conv1d.weight.squeeze(1).to(conv.dtype)).sum(-1) + self.conv1d.bias.to(conv.dtype)
        xBC = F.silu(xBC).to(x.dtype)
        xs, B, C = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        A = -torch.exp(_f32(self.A_log))

        if kernels:
            P, N = self.headdim, self.d_state
            y = selective_state_update(
                state.ssm, xs.reshape(b, self.nheads, P), dt[:, :, None].expand(b, self.nheads, P),
                A[:, None, None].expand(self.nheads, P, N), B.reshape(b, self.ngroups, N), C.reshape(b, self.ngroups, N),
                D=self.D[:, None].expand(self.nheads, P), z=None,
                dt_bias=self.dt_bias[:, None].expand(self.nheads, P), dt_softplus=True)
        else:
            g, r = self.ngroups, self.nheads // self.ngroups
            dt = F.softplus(_f32(dt) + _f32(self.dt_bias))  # (b, h)
            xh = _f32(xs).view(b, g, r, self.headdim)
            S = state.ssm.view(b, g, r, self.headdim, self.d_state)
            S = S * torch.exp(dt * A).view(b, g, r, 1, 1) + (dt.view(b, g, r, 1) * xh)[..., None] * _f32(B).view(b, g, 1, 1, self.d_state)
            y = (S @ _f32(C).view(b, g, 1, self.d_state, 1)).squeeze(-1) + _f32(self.D).view(g, r, 1) * xh
            state.ssm.copy_(S.view_as(state.ssm))
        y = y.reshape(b, 1, self.d_inner).to(x.dtype)
        return self._norm_out(y, z[:, None], kernels)
