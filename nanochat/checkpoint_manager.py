"""
Checkpoints: <base_dir>/<phase>_checkpoints/<model_tag>/
  model_<step>.pt          the model's state_dict (tensors only: loads with weights_only=True)
  meta_<step>.json         model config, the run's flags, step, metrics, loader state
  optim_<step>_rank<r>.pt  each rank's optimizer state (for --resume-from-step)
Every file is written under a temporary name and renamed, so a crash never leaves a broken one.
"""
import os
import re
import json

import torch

from nanochat.common import get_base_dir, atomic_write_json
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import get_tokenizer
from nanochat.nanochat_format import looks_like_nanochat

PHASE_DIRS = {"base": "base_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints"}


def checkpoint_dir(phase, model_tag):
    if phase not in PHASE_DIRS:
        raise ValueError(f"unknown checkpoint source {phase!r}: expected one of {', '.join(PHASE_DIRS)}")
    return os.path.join(get_base_dir(), PHASE_DIRS[phase], model_tag)


def model_tag_for(depth, block_pattern):
    return f"d{depth}" if set(block_pattern) == {"T"} else f"d{depth}_{block_pattern}"


def _atomic_torch_save(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(ckpt_dir, step, model_state, optim_state, meta, rank=0):
    os.makedirs(ckpt_dir, exist_ok=True)
    if "tokenizer" not in meta:
        try:   # which vocabulary the ids mean (checked by load_model)
            meta = dict(meta, tokenizer=get_tokenizer().fingerprint())
        except FileNotFoundError:
            pass
    if optim_state is not None:
        _atomic_torch_save(optim_state, os.path.join(ckpt_dir, f"optim_{step:06d}_rank{rank}.pt"))
    if rank == 0:
        _atomic_torch_save(model_state, os.path.join(ckpt_dir, f"model_{step:06d}.pt"))
        # meta last: a checkpoint counts as complete only once its meta file exists
        atomic_write_json(os.path.join(ckpt_dir, f"meta_{step:06d}.json"), meta)


def _load_tensors(path, device):
    if not os.path.exists(path):
        raise FileNotFoundError(f"missing checkpoint file {path}")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint file {path} is corrupt or truncated ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


def load_checkpoint(ckpt_dir, step, device, load_optimizer=False, rank=0):
    meta_path = os.path.join(ckpt_dir, f"meta_{step:06d}.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"no checkpoint at step {step} in {ckpt_dir} (missing {os.path.basename(meta_path)})")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path} is not valid JSON: {e}") from None
    model_state = _load_tensors(os.path.join(ckpt_dir, f"model_{step:06d}.pt"), device)
    optim_state = None
    if load_optimizer:
        optim_state = _load_tensors(os.path.join(ckpt_dir, f"optim_{step:06d}_rank{rank}.pt"), device)
    return model_state, optim_state, meta


def find_last_step(ckpt_dir):
    steps = [int(m.group(1)) for f in os.listdir(ckpt_dir) if (m := re.fullmatch(r"meta_(\d+)\.json", f))]
    if not steps:
        raise FileNotFoundError(f"no checkpoints in {ckpt_dir}")
    return max(steps)


def find_model_tag(phase):
    """The most recently written model tag of a phase, when the user gives none. A directory with
    no model file (a run killed before its first save) is not a model."""
    root = os.path.join(get_base_dir(), PHASE_DIRS[phase])
    tags = [t for t in os.listdir(root) if os.path.isdir(os.path.join(root, t))
            and any(re.fullmatch(r"model_\d+\.pt", f) for f in os.listdir(os.path.join(root, t)))] if os.path.isdir(root) else []
    if not tags:
        raise FileNotFoundError(f"no {phase} checkpoints under {root} (train one first)")
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(root, t)))


def build_model(model_config, model_state, device):
    config = GPTConfig(**model_config)
    with torch.device("meta"):
        model = GPT(config)
    # to_empty, but with torch.empty: empty_like of a meta tensor imports torch.fx's symbolic shapes (sympy, ~0.3 s)
    model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
    model.init_weights()   # buffers (rotary tables) and anything missing from old checkpoints
    try:
        model.load_state_dict(model_state, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"checkpoint does not match its model config ({str(e).splitlines()[0][:160]})") from None
    model.tie_weights()   # assign=True gave the head its own tensor
    model.eval()
    return model


def load_model(source, device, phase="eval", model_tag=None, step=None, expect_block_pattern=None):
    """Load (model, tokenizer, meta) from source 'base' | 'sft' | 'rl'."""
    model_tag = model_tag or find_model_tag(source)
    ckpt_dir = checkpoint_dir(source, model_tag)
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"no checkpoint directory {ckpt_dir}")
    step = find_last_step(ckpt_dir) if step is None else step
    model_state, _, meta = load_checkpoint(ckpt_dir, step, device)
    if looks_like_nanochat(meta):   # nanochat's config, no tokenizer fingerprint: its ids would be read as ours
        raise ValueError(f"{ckpt_dir} step {step} is a karpathy/nanochat checkpoint: import it first with "
                         f"`python -m scripts.import_nanochat --from {ckpt_dir} --tokenizer DIR_WITH_ITS_TOKENIZER_PKL`")
    pattern = meta["model_config"].get("block_pattern")
    if expect_block_pattern and pattern != expect_block_pattern:
        raise ValueError(f"checkpoint {ckpt_dir} step {step} has block pattern {pattern!r}, "
                         f"but --block-pattern {expect_block_pattern!r} was requested")
    model = build_model(meta["model_config"], model_state, device)
    if phase == "train":
        model.train()
    tokenizer = get_tokenizer()
    if meta.get("tokenizer") and meta["tokenizer"] != tokenizer.fingerprint():
        raise ValueError(f"checkpoint {ckpt_dir} step {step} was trained with tokenizer {meta['tokenizer']}, but "
                         f"{os.path.join(get_base_dir(), 'tokenizer')} is {tokenizer.fingerprint()}: was the tokenizer "
                         f"retrained after this checkpoint, or is NANOCHAT_BASE_DIR another run's?")
    tokenizer.query_position = meta.get("query_position", "after")   # the model reads as it was trained to
    tokenizer.text_prefix = meta.get("text_prefix", " ")
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.get_vocab_size()} tokens but the model only {model.config.vocab_size}: "
                         "was the tokenizer retrained after this checkpoint?")
    return model, tokenizer, meta
