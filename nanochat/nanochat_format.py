"""
Reading what karpathy/nanochat writes, so a model trained there keeps its exact behaviour here
(scripts/import_nanochat.py is the command; docs/nanochat-import.md the table and the parity numbers).

- Checkpoints: model_<step>.pt (a tensor dict) + meta_<step>.json ("model_config": sequence_len,
  vocab_size (the real one), n_layer, n_head, n_kv_head, n_embd[, window_pattern]). The meta never
  says which version of nanochat's model wrote it, so the generation is read from the weight names
  and shapes (GENERATIONS). A weight no generation has is refused by name, never skipped.
- Tokenizer: tokenizer.pkl, a pickled tiktoken Encoding. It is read with an unpickler that admits
  that one class and builds nothing from it but its four plain fields.
- transformers' NanoChatForCausalLM directories (config.json + model.safetensors): the first
  generation's architecture under other names.
Our GPT names the nanochat features as nanochat does, so a converted state dict loads strictly.
"""
import os
import re
import json
import pickle

import torch

from nanochat.common import UserError
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer, _make_encoding

NANOCHAT_SPECIALS = SPECIAL_TOKENS[:9]   # nanochat's, same order; ours append the document/search four
# new tokens start as the tool token that plays the same part: a document is a tool's output, a search a tool call
NEW_TOKEN_SOURCES = {"<|doc_start|>": "<|output_start|>", "<|doc_end|>": "<|output_end|>",
                     "<|search_start|>": "<|python_start|>", "<|search_end|>": "<|python_end|>"}

# Forward constants of each generation of nanochat's GPT (git history of nanochat/gpt.py; the commit
# where each begins). short_window(T): the S letter of window_pattern at sequence length T.
GENERATIONS = {
    "G0": dict(since="3a5e0bc 2025-10-13", rope_base=1e4, qk_gain=1.0, rope_bf16=True, short_window=None,
               what="attention + MLP only"),
    "G1": dict(since="aa530cd 2026-01-11", rope_base=1e4, qk_gain=1.0, rope_bf16=True, short_window=lambda T: T // 2,
               what="+ resid/x0 lambdas, sliding windows"),
    "G2": dict(since="e85db6b 2026-01-16", rope_base=1e4, qk_gain=1.0, rope_bf16=True, short_window=lambda T: T // 2,
               ve_gate_width=32, ve_gate_scale=2.0, what="+ value embeddings on alternate layers, gate width 32"),
    "G3": dict(since="6ed7d1d 2026-03-09", rope_base=1e5, qk_gain=1.15, rope_bf16=None,
               short_window=lambda T: -(-T // 3 // 128) * 128, ve_gate_width=12, ve_gate_scale=3.0,
               what="gate width 12 and 3*sigmoid, rope base 1e5, q/k gain 1.15"),
    "G4": dict(since="a825e63 2026-03-14", rope_base=1e5, qk_gain=1.2, rope_bf16=None,
               short_window=lambda T: -(-T // 4 // 128) * 128, ve_gate_width=12, ve_gate_scale=3.0, smear_width=24,
               what="+ smear and backout, q/k gain 1.2 (master)"),
}
# rope_bf16 None: the tables were cast to the compute dtype, bf16 exactly when the embedding was stored in bf16


# ---- tokenizer ----------------------------------------------------------------------------------
class _EncodingFields:
    """Stands in for tiktoken.core.Encoding while unpickling: keeps the state, runs nothing."""
    def __setstate__(self, state):
        self.state = state


class _TokenizerUnpickler(pickle.Unpickler):
    def __init__(self, f, path):
        super().__init__(f)
        self.path = path

    def find_class(self, module, name):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingFields
        raise UserError(f"{self.path}: refusing to unpickle {module}.{name}: a nanochat tokenizer.pkl holds only a tiktoken Encoding")


def read_tokenizer_pkl(path):
    """nanochat's tokenizer.pkl -> this project's Tokenizer: nanochat's merges, split pattern and 9
    special ids unchanged (text encodes to exactly nanochat's ids), our 4 retrieval tokens after them."""
    if not os.path.exists(path):
        raise UserError(f"no nanochat tokenizer at {path} (expected tokenizer.pkl, written by nanochat's tok_train)")
    try:
        with open(path, "rb") as f:
            obj = _TokenizerUnpickler(f, path).load()
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
    state = getattr(obj, "state", None) if isinstance(obj, _EncodingFields) else None
    if not (isinstance(state, dict) and isinstance(state.get("pat_str"), str)
            and isinstance(state.get("mergeable_ranks"), dict) and isinstance(state.get("special_tokens"), dict)):
        raise UserError(f"{path}: not a pickled tiktoken Encoding (found {type(obj).__name__})")
    return tokenizer_from_parts(state["pat_str"], state["mergeable_ranks"], state["special_tokens"], path)


def tokenizer_from_parts(pattern, ranks, specials, path):
    """Check that (ranks, specials) are a nanochat vocabulary and build ours from it."""
    if not all(isinstance(k, bytes) and isinstance(v, int) for k, v in ranks.items()):
        raise UserError(f"{path}: mergeable ranks must map bytes to ints")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError(f"{path}: mergeable ranks are not the ids 0..{len(ranks) - 1}")
    expected = {name: len(ranks) + k for k, name in enumerate(NANOCHAT_SPECIALS)}
    if specials != expected:
        raise UserError(f"{path}: special tokens {specials} differ from nanochat's {expected}: not a nanochat tokenizer")
    return Tokenizer(_make_encoding(pattern, ranks))


def _bytes_to_unicode():
    """GPT-2's byte <-> printable character table, which byte-level BPE vocabularies are written in."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def read_tokenizer_json(path, default_pattern):
    """transformers' tokenizer.json of a nanochat model (byte-level BPE whose ids are tiktoken's
    ranks) -> our Tokenizer. The split pattern is the file's own Split regex, else default_pattern."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        vocab = data["model"]["vocab"]
        added = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a transformers tokenizer.json ({type(e).__name__}: {e})") from None
    pre = data.get("pre_tokenizer") or {}
    splits = [p for p in [pre, *pre.get("pretokenizers", [])] if p.get("type") == "Split"]
    pattern = splits[0]["pattern"].get("Regex", default_pattern) if splits else default_pattern
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    ranks = {}
    for token, idx in vocab.items():
        if token in added:
            continue
        try:
            ranks[bytes(byte_of[c] for c in token)] = idx
        except KeyError:
            raise UserError(f"{path}: token {token!r} is not byte-level BPE") from None
    return tokenizer_from_parts(pattern, ranks, added, path)


# ---- checkpoints --------------------------------------------------------------------------------
def looks_like_nanochat(meta):
    """A checkpoint meta written by karpathy/nanochat (no block pattern, no tokenizer fingerprint)."""
    cfg = meta.get("model_config", {})
    return "block_pattern" not in cfg and "tokenizer" not in meta and {"n_layer", "n_embd", "vocab_size"} <= set(cfg)


def read_checkpoint(ckpt_dir, step=None):
    """(state, meta, step) of a nanochat checkpoint directory; the last step when step is None."""
    if not os.path.isdir(ckpt_dir):
        raise UserError(f"--from {ckpt_dir}: no such directory")
    steps = sorted(int(m.group(1)) for f in os.listdir(ckpt_dir) if (m := re.fullmatch(r"model_(\d+)\.pt", f)))
    if not steps:
        raise UserError(f"--from {ckpt_dir}: no model_<step>.pt in it (a nanochat checkpoint directory such as "
                        f"~/.cache/nanochat/base_checkpoints/d20)")
    step = steps[-1] if step is None else step
    model_path, meta_path = (os.path.join(ckpt_dir, f"{kind}_{step:06d}.{ext}") for kind, ext in (("model", "pt"), ("meta", "json")))
    if not os.path.exists(model_path):
        raise UserError(f"--step {step}: no {os.path.basename(model_path)} in {ckpt_dir} (steps there: {steps})")
    if not os.path.exists(meta_path):
        raise UserError(f"{meta_path}: missing (nanochat writes meta_<step>.json beside each model; its model_config is needed)")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except ValueError as e:
        raise UserError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta.get("model_config"), dict):
        raise UserError(f"{meta_path}: no model_config in it")
    try:
        state = torch.load(model_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{model_path}: not a tensor checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}   # saved from a compiled model
    return state, meta, step


def detect_generation(state, n_layer, path):
    """The generation whose weight names and shapes these are; refuses any weight none of them has."""
    layer = r"transformer\.h\.(\d+)\."
    known = [r"transformer\.wte\.weight", r"lm_head\.weight", layer + r"attn\.c_(q|k|v|proj)\.weight",
             layer + r"mlp\.c_(fc|proj)\.weight", r"resid_lambdas", r"x0_lambdas", r"value_embeds\.(\d+)\.weight",
             layer + r"attn\.ve_gate\.weight", r"smear_gate\.weight", r"smear_lambda", r"backout_lambda"]
    for key in state:
        if not any(re.fullmatch(p, key) for p in known):
            raise UserError(f"{path}: unknown weight {key!r} {tuple(state[key].shape)}: no nanochat generation this "
                            f"importer knows has it (refusing rather than skipping it)")
    has = lambda name: name in state
    scalars, smear = has("resid_lambdas") and has("x0_lambdas"), has("smear_gate.weight") and has("smear_lambda")
    ve_layers = sorted(int(m.group(1)) for k in state if (m := re.fullmatch(r"value_embeds\.(\d+)\.weight", k)))
    gates = {int(re.match(layer, k).group(1)): state[k].shape for k in state if k.endswith("attn.ve_gate.weight")}
    widths = {shape[1] for shape in gates.values()}
    if has("resid_lambdas") != has("x0_lambdas") or smear != has("backout_lambda") or has("smear_gate.weight") != has("smear_lambda"):
        raise UserError(f"{path}: a partial set of nanochat's scalar weights: not a generation this importer knows")
    if sorted(gates) != ve_layers or len(widths) > 1:
        raise UserError(f"{path}: value embeddings on layers {ve_layers} but gates on {sorted(gates)} (widths {sorted(widths)}): "
                        f"not a generation this importer knows")
    if ve_layers and ve_layers != [i for i in range(n_layer) if i % 2 == (n_layer - 1) % 2]:
        raise UserError(f"{path}: value embeddings on layers {ve_layers}, not nanochat's alternate layers ending at the last")
    width = widths.pop() if widths else None
    if not scalars and not ve_layers and not smear:
        return "G0"
    if scalars and not ve_layers and not smear:
        return "G1"
    if scalars and width == 32 and not smear:
        return "G2"
    if scalars and width == 12:
        return "G4" if smear else "G3"
    raise UserError(f"{path}: weights of no known generation (lambdas {scalars}, value-embedding gate width {width}, "
                    f"smear {smear}): see docs/nanochat-import.md")


def window_sizes(window_pattern, n_layer, sequence_len, short_window):
    """Per-layer attention windows as nanochat computes them: the pattern tiled, the last layer long."""
    if not window_pattern or short_window is None:
        return ()
    pattern = window_pattern.upper()
    if set(pattern) - {"S", "L"}:
        raise UserError(f"window_pattern {window_pattern!r} may only hold S and L")
    sizes = [sequence_len if pattern[i % len(pattern)] == "L" else short_window(sequence_len) for i in range(n_layer)]
    sizes[-1] = sequence_len
    return tuple(sizes)


def trunk_features(n_layer, sequence_len, window_pattern="SSSL", block_pattern=""):
    """nanochat master's trunk features for a model of this project (base_train --nanochat-arch):
    resid/x0 scalars, value embeddings on alternate attention layers, smear and backout, sliding
    windows. Rope base, q/k gain and attention scale stay this project's (tuned for tiny heads)."""
    g = GENERATIONS["G4"]
    pattern = block_pattern or "T" * n_layer
    windows = window_sizes(window_pattern, n_layer, sequence_len, g["short_window"])
    return dict(residual_scalars=True, smear_width=g["smear_width"], backout_layer=n_layer // 2,
                value_embed_layers=tuple(i for i in range(n_layer) if i % 2 == (n_layer - 1) % 2 and pattern[i] == "T"),
                attn_windows=tuple(w if pattern[i] == "T" else 0 for i, w in enumerate(windows)))


def model_config(cfg, state, generation, softcap=None, rope_bf16=None):
    """This project's GPTConfig fields for a nanochat model_config of a generation, every forward
    constant written out; vocab_size is the real vocabulary (growth adds rows later)."""
    g = GENERATIONS[generation]
    n_layer, n_head, n_embd = cfg["n_layer"], cfg["n_head"], cfg["n_embd"]
    if rope_bf16 is None:
        rope_bf16 = g["rope_bf16"] if g["rope_bf16"] is not None else state["transformer.wte.weight"].dtype == torch.bfloat16
    ve_layers = tuple(sorted(int(k.split(".")[1]) for k in state if k.startswith("value_embeds.")))
    return dict(
        sequence_len=cfg["sequence_len"], vocab_size=cfg["vocab_size"], n_layer=n_layer, n_head=n_head,
        n_kv_head=cfg.get("n_kv_head", n_head), n_embd=n_embd, block_pattern="T" * n_layer,
        logit_softcap=15.0 if softcap is None else float(softcap), tie_embeddings=False, short_conv=0,
        norm_eps=0.0, rope_base=g["rope_base"], rope_bf16=bool(rope_bf16), attn_scale=(n_embd // n_head) ** -0.5,
        qk_gain=g["qk_gain"], attn_windows=window_sizes(cfg.get("window_pattern", ""), n_layer, cfg["sequence_len"], g["short_window"]),
        residual_scalars=generation != "G0", value_embed_layers=ve_layers,
        ve_gate_width=g.get("ve_gate_width", 12), ve_gate_scale=g.get("ve_gate_scale", 3.0),
        smear_width=g.get("smear_width", 0), backout_layer=n_layer // 2 if g.get("smear_width") else -1)


def check_shapes(state, config, path):
    """Every weight has the shape the config implies (rows of vocabulary tables may be padded)."""
    from nanochat.gpt import GPT, GPTConfig
    with torch.device("meta"):
        expected = {k: v.shape for k, v in GPT(GPTConfig(**config)).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UserError(f"{path}: missing weight {missing[0]!r} that its model_config implies"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    V = config["vocab_size"]
    for key, want in expected.items():
        have = state[key].shape
        vocab_table = key in ("transformer.wte.weight", "lm_head.weight") or key.startswith("value_embeds.")
        if have != want and not (vocab_table and have[1:] == want[1:] and have[0] >= V):
            raise UserError(f"{path}: weight {key!r} has shape {tuple(have)}, its model_config implies {tuple(want)}")


def grow_vocab(state, tokenizer, old_vocab, pad_to=64, seed=0):
    """Append rows for our retrieval tokens and pad to a multiple of pad_to. New input rows (token and
    value embeddings) copy the tool token that plays the same part, plus noise at 1% of that row's
    scale so the two can part; new output rows start at the mean of the real ones (no token favoured).
    Rows 0..old_vocab-1 stay bit-identical, so nanochat's logits over its own vocabulary do too."""
    new_vocab = tokenizer.get_vocab_size()
    rows = -(-new_vocab // pad_to) * pad_to
    gen = torch.Generator().manual_seed(seed)
    out = dict(state)
    for key, w in state.items():
        if not (key in ("transformer.wte.weight", "lm_head.weight") or key.startswith("value_embeds.")):
            continue
        real = w[:old_vocab].float()
        grown = torch.zeros(rows, w.shape[1], dtype=torch.float32)
        grown[:old_vocab] = real
        if key == "lm_head.weight":
            grown[old_vocab:] = real.mean(dim=0)
        else:
            for name, source in NEW_TOKEN_SOURCES.items():
                src = real[tokenizer.special[source]]
                noise = torch.randn(w.shape[1], generator=gen) * 0.01 * src.pow(2).mean().sqrt()
                grown[tokenizer.special[name]] = src + noise
        out[key] = grown
    return out, rows


# ---- transformers' NanoChatForCausalLM ----------------------------------------------------------------
HF_NAMES = [(r"model\.embed_tokens\.weight", "transformer.wte.weight"), (r"lm_head\.weight", "lm_head.weight"),
            (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", r"transformer.h.\1.attn.c_q.weight"),
            (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", r"transformer.h.\1.attn.c_k.weight"),
            (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", r"transformer.h.\1.attn.c_v.weight"),
            (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"transformer.h.\1.attn.c_proj.weight"),
            (r"model\.layers\.(\d+)\.mlp\.fc1\.weight", r"transformer.h.\1.mlp.c_fc.weight"),
            (r"model\.layers\.(\d+)\.mlp\.fc2\.weight", r"transformer.h.\1.mlp.c_proj.weight")]


def is_transformers_dir(path):
    return os.path.exists(os.path.join(path, "config.json")) and os.path.exists(os.path.join(path, "model.safetensors"))


def read_transformers_dir(path):
    """(state in nanochat's names, nanochat-style model_config, forward constants) of a directory
    written by NanoChatForCausalLM.save_pretrained; refuses settings our GPT does not compute."""
    from safetensors.torch import load_file
    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            hf = json.load(f)
    except ValueError as e:
        raise UserError(f"{config_path}: not valid JSON ({e})") from None
    if hf.get("model_type") != "nanochat":
        raise UserError(f"{config_path}: model_type {hf.get('model_type')!r}, expected 'nanochat' (NanoChatForCausalLM)")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or {"rope_type": "default", "rope_theta": hf.get("rope_theta", 10000.0)}
    checks = [(hf.get("hidden_act", "relu2") == "relu2", f"hidden_act {hf.get('hidden_act')!r} (only relu2)"),
              (hf.get("intermediate_size", 4 * hidden) == 4 * hidden, f"intermediate_size {hf.get('intermediate_size')} (only 4 x hidden_size)"),
              (not hf.get("attention_bias", False), "attention_bias true"),
              (hf.get("head_dim") in (None, hidden // heads), f"head_dim {hf.get('head_dim')} (only hidden_size / heads)"),
              (rope.get("rope_type", "default") == "default", f"rope_type {rope.get('rope_type')!r} (only default)")]
    for ok, what in checks:
        if not ok:
            raise UserError(f"{config_path}: {what}: not a forward this project computes")
    raw = load_file(os.path.join(path, "model.safetensors"))
    state = {}
    for key, w in raw.items():
        for pattern, name in HF_NAMES:
            if re.fullmatch(pattern, key):
                state[re.sub(pattern, name, key)] = w
                break
        else:
            raise UserError(f"{path}/model.safetensors: unknown weight {key!r} {tuple(w.shape)} (refusing rather than skipping it)")
    tied = bool(hf.get("tie_word_embeddings", False))
    if tied:   # one matrix under both names, as this project's tied models save it
        state["lm_head.weight"] = state["transformer.wte.weight"]
    cfg = dict(sequence_len=hf.get("max_position_embeddings", 2048), vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
               n_head=heads, n_kv_head=hf.get("num_key_value_heads") or heads, n_embd=hidden)
    softcap = hf.get("final_logit_softcapping")
    constants = dict(rope_base=float(rope["rope_theta"]), norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=tied,
                     logit_softcap=float(softcap) if softcap else 0.0)
    return state, cfg, constants, hf
