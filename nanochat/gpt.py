"""
The GPT: a stack of blocks chosen by `block_pattern`, one character per layer:
  T = attention (RoPE, QK-norm, GQA) + MLP
  M = Mamba-2 mixer + MLP (see nanochat/mamba.py)
Other choices, as in nanochat: parameter-free RMSNorm, ReLU² MLP, untied embeddings (tied
with tie_embeddings), logit soft-cap, no biases. The features of karpathy/nanochat's later
generations (sliding windows, resid/x0 scalars, value embeddings, smear, backout, ...) are in
GPTConfig, off by default: scripts/import_nanochat.py turns on what a checkpoint has.

Inference uses an InferenceCache with one slot per layer (KV for T, conv+SSM state for M)
and a length per row, so the Engine can advance rows independently: a retrieved document
block is prefilled into one row in a single forward while the other rows wait.
"""
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.mamba import MAMBA_INITS, Mamba2Mixer, conv_window


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 32768
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4
    n_embd: int = 256
    block_pattern: str = ""          # "" means all T; otherwise one of T/M per layer
    mamba_d_state: int = 64
    mamba_headdim: int = 32
    mamba_expand: int = 2
    mamba_chunk_size: int = 64
    mamba_mlp: bool = True           # M blocks get an MLP after the mixer (Jamba, Samba, Nemotron-H)
    mamba_init: str = "default"      # mimetic | induction: M mixers start near linear attention (Mamba2Mixer.mimetic_init_)
    logit_softcap: float = 15.0      # logits = cap * tanh(logits / cap) (0: none)
    tie_embeddings: bool = False     # one matrix embeds tokens and scores them (see GPT.tie_weights)
    short_conv: int = 0              # T blocks: taps of a causal depthwise conv over the attention input (0: none)
    # Forward features of karpathy/nanochat's generations (scripts/import_nanochat.py sets them from a
    # checkpoint's weights); each default computes exactly what this project's models always computed.
    logit_vocab_size: int = 0        # logits cover the first this-many rows (0: all rows; the rest is padding)
    norm_eps: float = 0.0            # RMSNorm epsilon (0: torch's default, finfo.eps)
    rope_base: float = 10000.0
    rope_bf16: bool = False          # round the rotary tables to bf16 (nanochat before March 2026, and GPU-trained)
    attn_scale: float = 0.0          # attention logit scale (0: this project's rule, see CausalSelfAttention)
    qk_gain: float = 1.0             # q and k multiplied by this after QK-norm
    attn_windows: tuple = ()         # per layer: a query sees keys at most this many positions back (0: all)
    residual_scalars: bool = False   # learned resid_lambdas / x0_lambdas: x = r_i * x + a_i * x0 before block i
    value_embed_layers: tuple = ()   # layers whose attention values add a gated per-token embedding (ResFormer)
    ve_gate_width: int = 12          # the value-embedding gate reads this many channels of the block input
    ve_gate_scale: float = 3.0       # gate = scale * sigmoid(...)
    smear_width: int = 0             # > 0: each token's embedding mixes in the previous one's, gated on this many channels
    backout_layer: int = -1          # >= 0: subtract backout_lambda * (output of this block) before the final norm

    def __post_init__(self):
        if not self.block_pattern:
            self.block_pattern = "T" * self.n_layer
        bad = set(self.block_pattern) - {"T", "M"}
        if bad:
            raise ValueError(f"--block-pattern may only contain T and M, got {self.block_pattern!r}")
        if len(self.block_pattern) != self.n_layer:
            raise ValueError(f"--block-pattern {self.block_pattern!r} has {len(self.block_pattern)} letters "
                             f"but the model has {self.n_layer} layers (--depth)")
        if self.mamba_init not in MAMBA_INITS:
            raise ValueError(f"--mamba-init must be one of {', '.join(MAMBA_INITS)}, got {self.mamba_init!r}")
        if self.short_conv < 0 or self.short_conv == 1:
            raise ValueError(f"--short-conv is a number of taps >= 2 (or 0 for none), got {self.short_conv}")
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"n_embd {self.n_embd} / n_head {self.n_head} / n_kv_head {self.n_kv_head} do not divide")
        self.attn_windows = tuple(int(w) for w in self.attn_windows)
        self.value_embed_layers = tuple(int(i) for i in self.value_embed_layers)
        if self.attn_windows and len(self.attn_windows) != self.n_layer:
            raise ValueError(f"attn_windows needs one window per layer ({self.n_layer}), got {len(self.attn_windows)}")
        if any(w < 0 for w in self.attn_windows):
            raise ValueError(f"attn_windows must be >= 0 (0: unlimited), got {self.attn_windows}")
        bad_ve = [i for i in self.value_embed_layers if not (0 <= i < self.n_layer and self.block_pattern[i] == "T")]
        if bad_ve:
            raise ValueError(f"value_embed_layers {bad_ve} are not attention (T) layers of this model")
        if not (0 <= self.logit_vocab_size <= self.vocab_size):
            raise ValueError(f"logit_vocab_size {self.logit_vocab_size} must be in [0, vocab_size {self.vocab_size}]")
        if self.backout_layer >= self.n_layer:
            raise ValueError(f"backout_layer {self.backout_layer} must be < n_layer {self.n_layer}")

    def to_dict(self):
        """As saved in a checkpoint's meta (JSON: tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def config_from_depth(depth, vocab_size, sequence_len, aspect_ratio=64, head_dim=64, block_pattern="", **options):
    """The one dial: width = depth * aspect_ratio rounded up to whole heads; heads = width / head_dim."""
    if depth < 1:
        raise ValueError(f"--depth must be >= 1, got {depth}")
    n_embd = ((depth * aspect_ratio + head_dim - 1) // head_dim) * head_dim
    n_head = n_embd // head_dim
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_head, n_embd=n_embd, block_pattern=block_pattern or "T" * depth, **options)


def norm(x, eps=None):
    return F.rms_norm(x, (x.size(-1),), eps=eps)


def apply_rotary(x, cos, sin):
    # x (B, T, H, D); cos/sin (B or 1, T, 1, D/2)
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        # QK-norm makes |q| = |k| = sqrt(head_dim), so a logit is at most scale * head_dim. The usual
        # 1/sqrt(head_dim) caps it at sqrt(head_dim): fine for 128-dim heads (11.3), too soft for the
        # 32-dim heads of tiny models (5.7) to pick one token out of hundreds. Keep the 128-dim ceiling.
        self.scale = config.attn_scale or max(self.head_dim, 128) ** 0.5 / self.head_dim
        self.qk_gain, self.eps = config.qk_gain, config.norm_eps or None
        # value embeddings (ResFormer): v += gate * ve, one gate per kv head read from the block input
        self.ve_gate = (nn.Linear(config.ve_gate_width, self.n_kv_head, bias=False)
                        if layer_idx in config.value_embed_layers else None)
        self.ve_gate_scale = config.ve_gate_scale

    def forward(self, x, cos, sin, cache=None, rows=None, attn_mask=None, ve=None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            gate = self.ve_gate_scale * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate.in_features]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q, self.eps), norm(k, self.eps)   # QK-norm keeps attention logits in range without a tuned scale
        if self.qk_gain != 1.0:
            q, k = q * self.qk_gain, k * self.qk_gain
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # (B, H, T, D)
        if cache is not None:
            k, v = cache.update_kv(self.layer_idx, rows, k, v)
        gqa = self.n_head != self.n_kv_head
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale, enable_gqa=gqa)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


def short_causal_conv(x, weight, initial=None, seq_idx=None):
    """Depthwise causal conv without bias, x (B, T, C), weight (C, 1, w); initial (B, C, w-1) are
    the inputs before x (zeros if None). Plain shifted multiply-adds: torch.compile fuses them.
    seq_idx (B, T): a tap never reads a token of another packed document."""
    B, T, C = x.shape
    w = weight.shape[-1]
    taps = weight.to(x.dtype).view(C, w)
    before = x.new_zeros(B, w - 1, C) if initial is None else initial.transpose(1, 2).to(x.dtype)
    xp = torch.cat([before, x], dim=1)
    if seq_idx is not None:
        sp = torch.cat([seq_idx[:, :1].expand(B, w - 1), seq_idx], dim=1)
    out = x * taps[:, w - 1]
    for k in range(w - 1):   # tap k reads w-1-k tokens back
        xk = xp[:, k:k + T]
        if seq_idx is not None:
            xk = xk * (sp[:, k:k + T] == seq_idx).unsqueeze(-1).to(x.dtype)
        out = out + xk * taps[:, k]
    return out


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.kind = config.block_pattern[layer_idx]
        if self.kind == "T":
            self.attn = CausalSelfAttention(config, layer_idx)
        else:
            self.mixer = Mamba2Mixer(config.n_embd, d_state=config.mamba_d_state, expand=config.mamba_expand,
                                     headdim=config.mamba_headdim, chunk_size=config.mamba_chunk_size,
                                     layer_idx=layer_idx, init=config.mamba_init)
        self.mlp = MLP(config) if (self.kind == "T" or config.mamba_mlp) else None
        self.layer_idx = layer_idx
        # Each position's attention input also sees the few tokens before it (Allen-Zhu's "Canon"
        # layers; Mamba's conv does the same). A key then carries "what came just before me": the
        # first value token after `name:` can be found by the question's `name` in one attention
        # hop instead of waiting for a previous-token head to form. Starts at zero (= no conv).
        self.short_conv = (nn.Parameter(torch.zeros(config.n_embd, 1, config.short_conv))
                           if self.kind == "T" and config.short_conv > 0 else None)
        self.eps = config.norm_eps or None

    def short_conv_forward(self, h, cache, rows, seq_idx, lengths):
        if cache is None:
            return short_causal_conv(h, self.short_conv, seq_idx=seq_idx)
        return cache.conv_forward(self.layer_idx, h, self.short_conv, rows, lengths)

    def forward(self, x, cos, sin, cache=None, rows=None, attn_mask=None, seq_idx=None, lengths=None, ve=None):
        if self.kind == "T":
            h = norm(x, self.eps)
            if self.short_conv is not None:
                h = h + self.short_conv_forward(h, cache, rows, seq_idx, lengths)
            x = x + self.attn(h, cos, sin, cache, rows, attn_mask, ve)
        elif cache is None:
            x = x + self.mixer(norm(x, self.eps), seq_idx=seq_idx)
        else:
            x = x + cache.mamba_forward(self.layer_idx, self.mixer, norm(x, self.eps), rows, lengths)
        if self.mlp is not None:
            x = x + self.mlp(norm(x, self.eps))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        # Built on the meta device (checkpoint loading, base_train) the model holds shapes only: skip the
        # embeddings' own init and the rotary tables, which init_weights or the checkpoint replace. On meta
        # tensors normal_ and arange run through torch._refs, which imports torch._dynamo: ~1 s and ~70 MiB
        # in every process that loads a model.
        meta = torch.get_default_device().type == "meta"
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd, _weight=torch.empty(config.vocab_size, config.n_embd) if meta else None),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()
        # nanochat's generations (see GPTConfig): names as nanochat's, so its checkpoints load as they are
        if config.residual_scalars:
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, kv_dim, _weight=torch.empty(config.vocab_size, kv_dim) if meta else None)
                                           for i in config.value_embed_layers})
        if config.smear_width:
            self.smear_gate = nn.Linear(config.smear_width, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout_layer >= 0:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        # rotary tables cover 10x the training length so long generations never run out
        self.rotary_len = config.sequence_len * 10
        half = config.n_embd // config.n_head // 2
        cos, sin = (torch.empty(self.rotary_len, half), torch.empty(self.rotary_len, half)) if meta else self._rotary_tables(self.rotary_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _rotary_tables(self, seq_len, device=None):
        cfg = self.config
        head_dim = cfg.n_embd // cfg.n_head
        inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
        cos, sin = freqs.cos(), freqs.sin()
        if cfg.rope_bf16:   # rounded as the model saw them in training, kept in fp32
            cos, sin = cos.bfloat16().float(), sin.bfloat16().float()
        return cos, sin

    def tie_weights(self):
        """With tie_embeddings the head scores token t by its own embedding, so copying a token
        from the context is the identity map from the start; a tiny model trained on a CPU
        learned to copy names from documents within 100 steps tied and not in 700 untied.
        Called again after anything that replaces parameters (to_empty, load_state_dict(assign=True))."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    @torch.no_grad()
    def init_weights(self):
        """Initialise every weight we own. Mamba mixers initialise their own dt/A/D (never touched here)."""
        cfg = self.config
        self.tie_weights()
        if cfg.tie_embeddings:   # small: the same matrix scores the output, whose logits should start near 0
            torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=0.5 * cfg.n_embd ** -0.5)
        else:
            torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
            torch.nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        bound = 3 ** 0.5 * cfg.n_embd ** -0.5   # uniform with std 1/sqrt(fan_in)
        for block in self.transformer.h:
            if block.kind == "T":
                for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                    torch.nn.init.uniform_(lin.weight, -bound, bound)
                torch.nn.init.zeros_(block.attn.c_proj.weight)   # residual branches start as identity
                if block.short_conv is not None:
                    torch.nn.init.zeros_(block.short_conv)
            else:
                block.mixer.reset_parameters()
                torch.nn.init.zeros_(block.mixer.out_proj.weight)
            if block.mlp is not None:
                torch.nn.init.uniform_(block.mlp.c_fc.weight, -bound, bound)
                torch.nn.init.zeros_(block.mlp.c_proj.weight)
            if block.kind == "T" and block.attn.ve_gate is not None:
                torch.nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)   # gates start just above neutral
        # the nanochat features start as nanochat master starts them
        if cfg.residual_scalars:
            depth = torch.arange(cfg.n_layer, dtype=torch.float32) / max(cfg.n_layer - 1, 1)
            self.resid_lambdas.copy_(1.15 - 0.10 * depth)
            self.x0_lambdas.copy_(0.20 - 0.15 * depth)
        for ve in self.value_embeds.values():
            torch.nn.init.uniform_(ve.weight, -bound, bound)
        if cfg.smear_width:
            torch.nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
            torch.nn.init.zeros_(self.smear_lambda)
        if cfg.backout_layer >= 0:
            torch.nn.init.constant_(self.backout_lambda, 0.2)
        cos, sin = self._rotary_tables(self.rotary_len, device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def param_groups(self):
        """Muon takes the 2-D matrices inside blocks (value-embedding gates too); AdamW takes the
        embeddings (token and value), the head and every other parameter (Mamba's conv1d, dt_bias,
        A_log, D, norm weights; the residual, smear and backout scalars)."""
        matrices, others = [], []
        for block in self.transformer.h:
            for p in block.parameters():
                (matrices if p.ndim == 2 else others).append(p)
        for name in ("resid_lambdas", "x0_lambdas", "smear_lambda", "backout_lambda"):
            if hasattr(self, name):
                others.append(getattr(self, name))
        if self.config.smear_width:
            others.append(self.smear_gate.weight)
        value_embeds = list(self.value_embeds.parameters())
        if self.config.tie_embeddings:   # the shared matrix learns at the head's rate
            return {"matrix": matrices, "embedding": value_embeds, "unembedding": [self.lm_head.weight], "other": others}
        return {"matrix": matrices, "embedding": [self.transformer.wte.weight] + value_embeds,
                "unembedding": [self.lm_head.weight], "other": others}

    def forward(self, idx, targets=None, cache=None, rows=None, lengths=None, seq_idx=None, loss_reduction="mean",
                with_hits=False):
        """
        idx (B, T) token ids. targets (B, T) with -1 = ignored. seq_idx (B, T) optional document ids
        for packed rows: attention and Mamba state never cross a document boundary.
        With a cache: rows (list/tensor of row indices into the cache, default all) advance by T,
        or, with lengths (B,), row b by lengths[b]: idx is then right-padded (each row its own number
        of tokens, all fed in one forward) and the result is (B, V), the logits after each row's
        last real token.
        Returns logits (B, T, V) when targets is None, else the loss ("mean" or per-token "none"),
        and with with_hits also (B, T) bools: the argmax is the target (see supervised_loss).
        """
        x = self.trunk(idx, cache, rows, lengths, seq_idx)
        if targets is None:
            return self.head(x)
        loss, hits = self.supervised_loss(x, targets, loss_reduction)
        return (loss, hits) if with_hits else loss

    def trunk(self, idx, cache=None, rows=None, lengths=None, seq_idx=None):
        """Final hidden states (B, T, C) before the head ((B, C) with lengths); arguments as forward's.
        chat_sft --compile compiles this alone and keeps the sparse loss head eager."""
        B, T = idx.shape
        cfg = self.config
        attn_mask = None
        if cache is not None:
            rows = cache.resolve_rows(rows, B)
            pos, attn_mask = cache.begin(rows, T)
            if int(pos.max()) >= self.rotary_len:
                raise ValueError(f"generation reached {self.rotary_len} positions, the model's rotary limit")
            cos, sin = self.cos[pos].unsqueeze(2), self.sin[pos].unsqueeze(2)
            key_pos = torch.arange(attn_mask.size(-1), device=idx.device)
        else:
            if T > self.rotary_len:
                raise ValueError(f"sequence of {T} tokens exceeds the rotary limit {self.rotary_len}")
            cos, sin = self.cos[:T][None, :, None, :], self.sin[:T][None, :, None, :]
            pos = key_pos = torch.arange(T, device=idx.device)
            if (seq_idx is not None and "T" in cfg.block_pattern) or any(cfg.attn_windows):
                attn_mask = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()[None, None]
            if seq_idx is not None and "T" in cfg.block_pattern:
                attn_mask = attn_mask & (seq_idx.unsqueeze(2) == seq_idx.unsqueeze(1)).unsqueeze(1)   # (B, 1, T, T)
        # sliding windows: query i sees key j only if i - j <= window (nanochat's rule), one mask per window
        masks = {0: attn_mask}
        for w in set(cfg.attn_windows) - {0}:
            masks[w] = attn_mask & ((pos.unsqueeze(-1) - key_pos) <= w).view(-1, 1, *attn_mask.shape[-2:])
        x = norm(self.transformer.wte(idx), cfg.norm_eps or None)
        if cfg.smear_width:
            x = self.smear(x, cache, rows, seq_idx, lengths)
        x0, x_backout = x, None
        for i, block in enumerate(self.transformer.h):
            if cfg.residual_scalars:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            mask = masks[cfg.attn_windows[i]] if cfg.attn_windows else attn_mask
            x = block(x, cos, sin, cache, rows, mask, seq_idx, lengths, ve)
            if i == cfg.backout_layer:
                x_backout = x
        if x_backout is not None:   # take back what the middle of the stack wrote (nanochat's backout)
            x = x - self.backout_lambda * x_backout
        x = norm(x, cfg.norm_eps or None)
        if cache is not None:
            cache.advance(rows, T if lengths is None else lengths)
            if lengths is not None:   # only the last real token of each row is scored
                x = x[torch.arange(B, device=x.device), lengths.to(x.device) - 1]
        return x

    def smear(self, x, cache, rows, seq_idx, lengths):
        """x_t += smear_lambda * sigmoid(smear_gate(x_t[:w])) * x_{t-1} for every token with a previous
        one: in this row (the cache remembers each row's last embedding), in its own packed document."""
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :self.config.smear_width]))
        prev = torch.cat([x.new_zeros(x.size(0), 1, x.size(2)), x[:, :-1]], dim=1)
        if cache is not None:
            start = cache.lengths[rows]
            prev[:, 0] = cache.prev_embed[rows]
            has_prev = (start > 0).view(-1, 1, 1) | (torch.arange(x.size(1), device=x.device) > 0).view(1, -1, 1)
            last = x[torch.arange(x.size(0), device=x.device), (lengths.to(x.device) - 1) if lengths is not None else -1]
            cache.prev_embed[rows] = last.to(cache.prev_embed.dtype)
        else:
            has_prev = (torch.arange(x.size(1), device=x.device) > 0).view(1, -1, 1)
            if seq_idx is not None:
                has_prev = has_prev & torch.cat([seq_idx[:, :1], seq_idx[:, :-1]], dim=1).eq(seq_idx).unsqueeze(-1)
        return x + (gate * prev) * has_prev

    def head(self, x):
        """Final hidden states -> soft-capped logits (fp32), over the real vocabulary."""
        logits = self.lm_head(x).float()
        if self.config.logit_vocab_size:
            logits = logits[..., :self.config.logit_vocab_size]
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    def supervised_loss(self, x, targets, loss_reduction="mean"):
        """Cross-entropy of final hidden states x (B, T, C) against targets (-1 = ignored), with the
        head run only where a target is: SFT and RL supervise a few percent of the positions, and the
        (B, T, vocab) logits of the rest were most of a step's time and memory. Returns (loss, hits):
        loss "mean" or per-token "none" (flat B*T, 0 where ignored), hits (B, T) bool, True where the
        argmax is the target (teacher-forced exact match)."""
        supervised = targets >= 0
        if torch.compiler.is_compiling():   # one fixed-shape graph: score every position, ignore_index masks
            logits = self.head(x.flatten(0, 1))
            loss = F.cross_entropy(logits, targets.reshape(-1), ignore_index=-1,
                                   reduction="none" if loss_reduction == "none" else "mean")
            return loss, (logits.detach().argmax(-1) == targets.reshape(-1)).view_as(targets) & supervised
        every = bool(supervised.all())
        logits = self.head(x.flatten(0, 1) if every else x[supervised])
        picked = targets.reshape(-1) if every else targets[supervised]
        loss = F.cross_entropy(logits, picked, reduction="none" if loss_reduction == "none" else "mean")
        hits = torch.zeros_like(supervised)
        hits[supervised] = logits.detach().argmax(-1) == picked
        if loss_reduction == "none" and not every:
            loss = torch.zeros(targets.shape, dtype=loss.dtype, device=loss.device).masked_scatter(supervised, loss)
        return (loss.reshape(-1) if loss_reduction == "none" else loss), hits


class InferenceCache:
    """
    Per-layer generation state for a batch of rows, each with its own length:
    KV tensors (B, H_kv, max_len, D) for T layers (each head's keys contiguous, as attention reads
    them), MambaState for M layers. The KV tensors grow
    (doubling) when a forward would run past max_len, so callers size them for the usual case.
    A forward over all rows (rows=None) reads the cache through views; a subset of rows gathers.
    """

    def __init__(self, model, batch_size, max_len, device=None, dtype=torch.float32):
        cfg = model.config
        device = device or model.lm_head.weight.device
        head_dim = cfg.n_embd // cfg.n_head
        self.batch_size, self.max_len = batch_size, max_len
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.k, self.v, self.mamba, self.conv = {}, {}, {}, {}
        # the last token embedding of each row, for the smear of the next one (nanochat's smear)
        self.prev_embed = torch.zeros(batch_size, cfg.n_embd, device=device, dtype=dtype) if cfg.smear_width else None
        for i, block in enumerate(model.transformer.h):
            if block.kind == "T":
                self.k[i] = torch.zeros(batch_size, cfg.n_kv_head, max_len, head_dim, device=device, dtype=dtype)
                self.v[i] = torch.zeros_like(self.k[i])
                if block.short_conv is not None:   # the last short_conv attention inputs of each row
                    self.conv[i] = torch.zeros(batch_size, cfg.n_embd, cfg.short_conv, device=device, dtype=dtype)
            else:
                self.mamba[i] = block.mixer.allocate_state(batch_size, device)
        self._all_rows = torch.arange(batch_size, device=device)

    def resolve_rows(self, rows, n):
        if rows is None:
            if n != self.batch_size:
                raise ValueError(f"batch of {n} rows given to a cache of {self.batch_size} without `rows`")
            return self._all_rows
        return torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)

    def begin(self, rows, T):
        """Start a forward of T tokens for rows: grow the KV tensors if needed; returns the positions
        (B, T) and the attention mask (B, 1, T, S) letting query t of row b see keys < length_b + t + 1."""
        start = self.lengths[rows]
        S = int(start.max()) + T
        if S > self.max_len:
            self._grow(max(S, 2 * self.max_len))
        self._pos = start.unsqueeze(1) + torch.arange(T, device=start.device)   # (B, T)
        self._S = S
        mask = torch.arange(S, device=start.device)[None, None, :] <= self._pos[:, :, None]
        return self._pos, mask.unsqueeze(1)

    def _grow(self, new_len):
        for store in (self.k, self.v):
            for i, t in store.items():
                bigger = t.new_zeros(t.shape[0], t.shape[1], new_len, t.shape[3])
                bigger[:, :, :self.max_len] = t
                store[i] = bigger
        self.max_len = new_len

    def update_kv(self, layer, rows, k, v):
        """Write k, v (B, H, T, D) at the positions `begin` computed; return the rows' keys/values so
        far, (B, H, S, D)."""
        B, _, T, _ = k.shape
        kc, vc = self.k[layer], self.v[layer]
        if rows is self._all_rows and T == 1:   # a decode step: a scatter along time
            idx = self._pos.view(B, 1, 1, 1).expand(B, kc.shape[1], 1, kc.shape[3])
            kc.scatter_(2, idx, k.to(kc.dtype))
            vc.scatter_(2, idx, v.to(vc.dtype))
        else:
            r = rows.unsqueeze(1).expand(B, T)
            kc[r, :, self._pos] = k.transpose(1, 2).to(kc.dtype)   # indexed (B, T, H, D)
            vc[r, :, self._pos] = v.transpose(1, 2).to(vc.dtype)
        if rows is self._all_rows:
            keys, vals = kc[:, :, :self._S], vc[:, :, :self._S]
        else:
            keys, vals = kc[rows, :, :self._S], vc[rows, :, :self._S]
        return keys.to(k.dtype), vals.to(v.dtype)

    def mamba_forward(self, layer, mixer, x, rows, lengths=None):
        """Run a Mamba mixer for a subset of rows, continuing from and updating their state
        (with lengths: row b's state stops after its lengths[b] real tokens)."""
        full = rows is self._all_rows or (len(rows) == self.batch_size and bool((rows == self._all_rows).all()))
        state = self.mamba[layer] if full else self.mamba[layer].index_select(rows)
        y = mixer.step(x, state) if x.shape[1] == 1 else mixer(x, state=state, lengths=lengths)
        if not full:
            self.mamba[layer].conv[rows] = state.conv
            self.mamba[layer].ssm[rows] = state.ssm
        return y

    def conv_forward(self, layer, x, weight, rows, lengths=None):
        """A T block's short conv for a subset of rows, continuing from and updating their window."""
        window = self.conv[layer][rows]
        y = short_causal_conv(x, weight, initial=window[:, :, 1:])
        self.conv[layer][rows] = conv_window(window, x, lengths)
        return y

    def advance(self, rows, T):
        self.lengths[rows] += T

    def keep(self, rows):
        """Drop every row not in rows (finished samples): row rows[j] becomes row j."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)
        for store in (self.k, self.v):
            for i, t in store.items():
                store[i] = t.index_select(0, rows)
        self.mamba = {i: state.index_select(rows) for i, state in self.mamba.items()}
        self.conv = {i: window.index_select(0, rows) for i, window in self.conv.items()}
        if self.prev_embed is not None:
            self.prev_embed = self.prev_embed.index_select(0, rows)
        self.lengths = self.lengths.index_select(0, rows)
        self.batch_size = len(rows)
        self._all_rows = torch.arange(self.batch_size, device=self.lengths.device)

    def fan_out(self, n):
        """Rows are groups of n samples of one prompt, and only the first row of each group was
        prefilled: copy it into the other n - 1 rows of its group."""
        P = self.batch_size // n
        L = int(self.lengths.max())
        for store in (self.k, self.v):
            for t in store.values():
                g = t.view(P, n, *t.shape[1:])
                g[:, 1:, :, :L] = g[:, :1, :, :L]
        windows = [t for state in self.mamba.values() for t in (state.conv, state.ssm)] + list(self.conv.values())
        if self.prev_embed is not None:
            windows.append(self.prev_embed)
        for t in windows:
            g = t.view(P, n, *t.shape[1:])
            g[:, 1:] = g[:, :1]
        g = self.lengths.view(P, n)
        g[:, 1:] = g[:, :1]
