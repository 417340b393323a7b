"""
The GPT: a stack of blocks chosen by `block_pattern`, one character per layer:
  T = attention (RoPE, QK-norm, GQA) + MLP
  M = Mamba-2 mixer + MLP (see nanochat/mamba.py)
Other choices, as in nanochat: parameter-free RMSNorm, ReLU² MLP, untied embeddings (tied
with tie_embeddings), logit soft-cap, no biases.

Inference uses an InferenceCache with one slot per layer (KV for T, conv+SSM state for M)
and a length per row, so the Engine can advance rows independently: a retrieved document
block is prefilled into one row in a single forward while the other rows wait.
"""
import math
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F


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
    logit_softcap: float = 15.0
    tie_embeddings: bool = False     # one matrix embeds tokens and scores them (see GPT.tie_weights)

    def __post_init__(self):
        if not self.block_pattern:
            self.block_pattern = "T" * self.n_layer
        bad = set(self.block_pattern) - {"T", "M"}
        if bad:
            raise ValueError(f"--block-pattern may only contain T and M, got {self.block_pattern!r}")
        if len(self.block_pattern) != self.n_layer:
            raise ValueError(f"--block-pattern {self.block_pattern!r} has {len(self.block_pattern)} letters "
                             f"but the model has {self.n_layer} layers (--depth)")
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"n_embd {self.n_embd} / n_head {self.n_head} / n_kv_head {self.n_kv_head} do not divide")

    def to_dict(self):
        return asdict(self)


def config_from_depth(depth, vocab_size, sequence_len, aspect_ratio=64, head_dim=64, block_pattern="", **options):
    """The one dial: width = depth * aspect_ratio rounded up to whole heads; heads = width / head_dim."""
    if depth < 1:
        raise ValueError(f"--depth must be >= 1, got {depth}")
    n_embd = ((depth * aspect_ratio + head_dim - 1) // head_dim) * head_dim
    n_head = n_embd // head_dim
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_head, n_embd=n_embd, block_pattern=block_pattern or "T" * depth, **options)


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


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
        self.scale = max(self.head_dim, 128) ** 0.5 / self.head_dim

    def forward(self, x, cos, sin, cache=None, rows=None, attn_mask=None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q), norm(k)   # QK-norm keeps attention logits in range without a tuned scale
        if cache is not None:
            k, v, attn_mask = cache.update_kv(self.layer_idx, rows, k, v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # (B, H, T, D)
        gqa = self.n_head != self.n_kv_head
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale, enable_gqa=gqa)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


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
            from nanochat.mamba import Mamba2Mixer
            self.mixer = Mamba2Mixer(config.n_embd, d_state=config.mamba_d_state, expand=config.mamba_expand,
                                     headdim=config.mamba_headdim, chunk_size=config.mamba_chunk_size,
                                     layer_idx=layer_idx)
        self.mlp = MLP(config) if (self.kind == "T" or config.mamba_mlp) else None
        self.layer_idx = layer_idx

    def forward(self, x, cos, sin, cache=None, rows=None, attn_mask=None, seq_idx=None):
        if self.kind == "T":
            x = x + self.attn(norm(x), cos, sin, cache, rows, attn_mask)
        elif cache is None:
            x = x + self.mixer(norm(x), seq_idx=seq_idx)
        else:
            x = x + cache.mamba_forward(self.layer_idx, self.mixer, norm(x), rows)
        if self.mlp is not None:
            x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()
        # rotary tables cover 10x the training length so long generations never run out
        self.rotary_len = config.sequence_len * 10
        head_dim = config.n_embd // config.n_head
        cos, sin = self._rotary_tables(self.rotary_len, head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @staticmethod
    def _rotary_tables(seq_len, head_dim, base=10000, device=None):
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
        return freqs.cos(), freqs.sin()

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
            else:
                block.mixer.reset_parameters()
                torch.nn.init.zeros_(block.mixer.out_proj.weight)
            if block.mlp is not None:
                torch.nn.init.uniform_(block.mlp.c_fc.weight, -bound, bound)
                torch.nn.init.zeros_(block.mlp.c_proj.weight)
        cos, sin = self._rotary_tables(self.rotary_len, cfg.n_embd // cfg.n_head, device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def param_groups(self):
        """Muon takes the 2-D matrices inside blocks; AdamW takes embeddings, the head and every
        other parameter (Mamba's conv1d, dt_bias, A_log, D, norm weights)."""
        matrices, others = [], []
        for block in self.transformer.h:
            for p in block.parameters():
                (matrices if p.ndim == 2 else others).append(p)
        if self.config.tie_embeddings:   # the shared matrix learns at the head's rate
            return {"matrix": matrices, "embedding": [], "unembedding": [self.lm_head.weight], "other": others}
        return {"matrix": matrices, "embedding": [self.transformer.wte.weight],
                "unembedding": [self.lm_head.weight], "other": others}

    def forward(self, idx, targets=None, cache=None, rows=None, seq_idx=None, loss_reduction="mean"):
        """
        idx (B, T) token ids. targets (B, T) with -1 = ignored. seq_idx (B, T) optional document ids
        for packed rows: attention and Mamba state never cross a document boundary.
        With a cache: rows (list/tensor of row indices into the cache, default all) advance by T.
        Returns logits (B, T, V) when targets is None, else the loss ("mean" or per-token "none").
        """
        B, T = idx.shape
        attn_mask = None
        if cache is not None:
            rows = cache.resolve_rows(rows, B)
            pos = cache.lengths[rows].unsqueeze(1) + torch.arange(T, device=idx.device)   # (B, T)
            if int(pos.max()) >= self.rotary_len:
                raise ValueError(f"generation reached {self.rotary_len} positions, the model's rotary limit")
            cos, sin = self.cos[pos].unsqueeze(2), self.sin[pos].unsqueeze(2)
        else:
            if T > self.rotary_len:
                raise ValueError(f"sequence of {T} tokens exceeds the rotary limit {self.rotary_len}")
            cos, sin = self.cos[:T][None, :, None, :], self.sin[:T][None, :, None, :]
            if seq_idx is not None and "T" in self.config.block_pattern:
                same = seq_idx.unsqueeze(2) == seq_idx.unsqueeze(1)
                causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
                attn_mask = (same & causal).unsqueeze(1)   # (B, 1, T, T)
        x = norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, cos, sin, cache, rows, attn_mask, seq_idx)
        x = norm(x)
        if cache is not None:
            cache.advance(rows, T)
        logits = self.lm_head(x).float()
        cap = self.config.logit_softcap
        logits = cap * torch.tanh(logits / cap)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)
        return loss


class InferenceCache:
    """
    Per-layer generation state for a batch of rows, each with its own length:
    KV tensors (B, max_len, H_kv, D) for T layers, MambaState for M layers.
    """

    def __init__(self, model, batch_size, max_len, device=None, dtype=torch.float32):
        cfg = model.config
        device = device or model.lm_head.weight.device
        head_dim = cfg.n_embd // cfg.n_head
        self.batch_size, self.max_len = batch_size, max_len
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.k, self.v, self.mamba = {}, {}, {}
        for i, block in enumerate(model.transformer.h):
            if block.kind == "T":
                self.k[i] = torch.zeros(batch_size, max_len, cfg.n_kv_head, head_dim, device=device, dtype=dtype)
                self.v[i] = torch.zeros_like(self.k[i])
            else:
                self.mamba[i] = block.mixer.allocate_state(batch_size, device)
        self._all_rows = torch.arange(batch_size, device=device)

    def resolve_rows(self, rows, n):
        if rows is None:
            if n != self.batch_size:
                raise ValueError(f"batch of {n} rows given to a cache of {self.batch_size} without `rows`")
            return self._all_rows
        return torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)

    def update_kv(self, layer, rows, k, v):
        """Write k, v (B, T, H, D) at each row's current length; return the rows' keys/values so far
        and the mask (B, 1, T, S) letting query t of row b see keys < length_b + t + 1."""
        B, T = k.shape[:2]
        start = self.lengths[rows]
        if int(start.max()) + T > self.max_len:
            raise ValueError(f"inference cache full ({self.max_len} tokens)")
        pos = start.unsqueeze(1) + torch.arange(T, device=k.device)          # (B, T)
        r = rows.unsqueeze(1).expand(B, T)
        self.k[layer][r, pos] = k.to(self.k[layer].dtype)
        self.v[layer][r, pos] = v.to(self.v[layer].dtype)
        S = int(start.max()) + T
        keys, vals = self.k[layer][rows, :S], self.v[layer][rows, :S]
        mask = torch.arange(S, device=k.device)[None, None, :] <= pos[:, :, None]   # (B, T, S)
        return keys.to(k.dtype), vals.to(v.dtype), mask.unsqueeze(1)

    def mamba_forward(self, layer, mixer, x, rows):
        """Run a Mamba mixer for a subset of rows, continuing from and updating their state."""
        full = rows is self._all_rows or (len(rows) == self.batch_size and bool((rows == self._all_rows).all()))
        state = self.mamba[layer] if full else self.mamba[layer].index_select(rows)
        y = mixer.step(x, state) if x.shape[1] == 1 else mixer(x, state=state)
        if not full:
            self.mamba[layer].conv[rows] = state.conv
            self.mamba[layer].ssm[rows] = state.ssm
        return y

    def advance(self, rows, T):
        self.lengths[rows] += T

    def repeat_batch(self, n):
        """A batch-1 cache (the prefilled prompt) copied into n rows."""
        assert self.batch_size == 1, "repeat_batch expects a batch-1 cache"
        new = object.__new__(InferenceCache)
        new.batch_size, new.max_len = n, self.max_len
        new.lengths = self.lengths.repeat(n)
        new.k = {i: t.repeat(n, 1, 1, 1) for i, t in self.k.items()}
        new.v = {i: t.repeat(n, 1, 1, 1) for i, t in self.v.items()}
        new.mamba = {i: s.repeat_batch(n) for i, s in self.mamba.items()}
        new._all_rows = torch.arange(n, device=self.lengths.device)
        return new
