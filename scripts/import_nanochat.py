"""
Bring your nanochat model: import a checkpoint that karpathy/nanochat trained (any generation of its
GPT, base or chat), or a transformers NanoChatForCausalLM directory, so this project's SFT, RL, eval,
chat and web stages run on it.

    python -m scripts.import_nanochat --from ~/.cache/nanochat/base_checkpoints/d20 \\
        --tokenizer ~/.cache/nanochat/tokenizer --tag d20
    NANOCHAT_BASE_DIR=~/.cache/nanochat-rag python -m scripts.chat_sft --source base --model-tag d20 ...

What it does, in order (nothing is written until every check passed):
1. reads nanochat's tokenizer.pkl (a restricted unpickler: only a tiktoken Encoding) and keeps its
   ids: text encodes exactly as in nanochat; our 4 document/search tokens are appended;
2. reads the weights, tells the generation of nanochat's model from their names and shapes, and
   refuses, by name, any weight it does not know;
3. writes every forward constant of that generation into the model config (rope base and table
   rounding, q/k gain, attention scale, sliding windows, residual scalars, value embeddings, smear,
   backout, softcap), so the model computes what nanochat computed (docs/nanochat-import.md: parity);
4. grows the vocabulary: new input rows from the analogous tool token, new output rows at the mean,
   padded to a multiple of 64; logits over nanochat's own vocabulary are unchanged, bit for bit;
5. writes <out>/tokenizer/ and <out>/<base|chatsft>_checkpoints/<tag>/ (this project's formats).
"""
import os
import json
import argparse

import torch

from nanochat.common import UserError, die, get_base_dir
from nanochat.checkpoint_manager import PHASE_DIRS, build_model, save_checkpoint
from nanochat.tokenizer import Tokenizer, get_tokenizer_dir, SPLIT_PATTERN
from nanochat import nanochat_format as nf

parser = argparse.ArgumentParser(description="Import a karpathy/nanochat checkpoint (or a transformers NanoChatForCausalLM "
                                 "directory) as this project's checkpoint and tokenizer.")
parser.add_argument("--from", dest="source", required=True,
                    help="nanochat checkpoint directory (model_<step>.pt + meta_<step>.json, e.g. ~/.cache/nanochat/base_checkpoints/d20), "
                         "or a directory with config.json + model.safetensors (NanoChatForCausalLM.save_pretrained)")
parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
parser.add_argument("--tokenizer", default=None,
                    help="directory with nanochat's tokenizer.pkl (or tokenizer.json for a transformers directory); "
                         "default: ../../tokenizer beside a nanochat checkpoint directory, or --from itself")
parser.add_argument("--tag", default=None, help="model tag to write (default d<layers>)")
parser.add_argument("--as", dest="phase", default="base", choices=["base", "sft"],
                    help="write it as a base model (then run chat_sft) or as a chat model (chat_cli/chat_eval/chat_rl --source sft)")
parser.add_argument("--out-base-dir", default=None, help="where to write (default: $NANOCHAT_BASE_DIR, else ~/.cache/nanochat-rag)")
parser.add_argument("--softcap", type=float, default=None,
                    help="logit softcap: the one constant the weights cannot tell (15, except 20 for nanochat commits "
                         "aba30cb..6ed7d1d, March 2026); default 15, or config.json's for a transformers directory")
parser.add_argument("--rope-bf16", default="auto", choices=["auto", "yes", "no"],
                    help="round rotary tables to bf16 as the model saw them in training (auto: by generation, and for 2026-03 "
                         "and later by the dtype nanochat stored the embedding in: bf16 = trained on GPU)")
parser.add_argument("--short-conv", type=int, default=0,
                    help="add this project's short causal conv (taps) to each attention input, all zero: the logits stay "
                         "nanochat's exactly, and fine-tuning can use it to read (the CPU recipe uses 4; 0: none)")
parser.add_argument("--seed", type=int, default=0, help="seed of the small noise on the new tokens' embedding rows (default 0)")
args = parser.parse_args()


def find_tokenizer(source, is_hf):
    if args.tokenizer:
        return args.tokenizer
    beside = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(source))), "tokenizer")
    candidates = [source] if is_hf else [beside]
    for c in candidates:
        if os.path.exists(os.path.join(c, "tokenizer.pkl")) or (is_hf and os.path.exists(os.path.join(c, "tokenizer.json"))):
            return c
    raise UserError(f"no nanochat tokenizer found at {candidates[0]}: pass --tokenizer DIR (the directory with tokenizer.pkl)")


def main():
    source = os.path.expanduser(args.source)
    out_base = os.path.abspath(os.path.expanduser(args.out_base_dir)) if args.out_base_dir else get_base_dir()
    if not os.path.isdir(source):
        raise UserError(f"--from {source}: no such directory")
    if args.short_conv < 0 or args.short_conv == 1:
        raise UserError(f"--short-conv is a number of taps >= 2 (or 0 for none), got {args.short_conv}")
    is_hf = nf.is_transformers_dir(source)

    # 1. tokenizer
    tok_dir = os.path.expanduser(find_tokenizer(source, is_hf))
    pkl = os.path.join(tok_dir, "tokenizer.pkl")
    if os.path.exists(pkl) or not is_hf:
        tokenizer = nf.read_tokenizer_pkl(pkl)
    else:
        tokenizer = nf.read_tokenizer_json(os.path.join(tok_dir, "tokenizer.json"), SPLIT_PATTERN)
    old_vocab = tokenizer.get_vocab_size() - (len(tokenizer.special) - len(nf.NANOCHAT_SPECIALS))

    # 2. weights and generation
    if is_hf:
        state, cfg, constants, hf = nf.read_transformers_dir(source)
        generation, step, nanochat_meta = "G0", 0, {"config.json": hf}
        config = nf.model_config(cfg, state, "G0", softcap=constants["logit_softcap"] if args.softcap is None else args.softcap,
                                 rope_bf16=args.rope_bf16 == "yes")
        config.update(rope_base=constants["rope_base"], norm_eps=constants["norm_eps"], tie_embeddings=constants["tie_embeddings"])
    else:
        state, nanochat_meta, step = nf.read_checkpoint(source, args.step)
        cfg = nanochat_meta["model_config"]
        missing = [k for k in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_embd") if k not in cfg]
        if missing:
            raise UserError(f"{source}: meta_{step:06d}.json model_config lacks {', '.join(missing)}")
        generation = nf.detect_generation(state, cfg["n_layer"], source)
        rope_bf16 = None if args.rope_bf16 == "auto" else args.rope_bf16 == "yes"
        config = nf.model_config(cfg, state, generation, softcap=args.softcap, rope_bf16=rope_bf16)
    if cfg["vocab_size"] != old_vocab:
        raise UserError(f"tokenizer {tok_dir} has {old_vocab} tokens but the checkpoint's vocab_size is {cfg['vocab_size']}: "
                        f"the tokenizer of another run?")
    nf.check_shapes(state, config, source)
    g = nf.GENERATIONS[generation]
    print(f"read {source} step {step}: nanochat generation {generation} ({g['what']}; since {g['since']})")
    print(f"  {config['n_layer']} layers, width {config['n_embd']}, {config['n_head']} heads ({config['n_kv_head']} kv), "
          f"context {config['sequence_len']}, vocab {old_vocab}")
    print(f"  forward: rope base {config['rope_base']:g}{' (bf16 tables)' if config['rope_bf16'] else ''}, q/k gain "
          f"{config['qk_gain']}, attention scale {config['attn_scale']:.4f}, windows {list(config['attn_windows']) or 'none'}, "
          f"softcap {config['logit_softcap']:g}, value embeddings on {list(config['value_embed_layers']) or 'none'}, "
          f"smear {'yes' if config['smear_width'] else 'no'}, backout {'layer %d' % config['backout_layer'] if config['backout_layer'] >= 0 else 'no'}")

    # 3. vocabulary growth, fp32, and a strict load: every weight used, every parameter given
    state, rows = nf.grow_vocab(state, tokenizer, old_vocab, seed=args.seed)
    if args.short_conv:
        config["short_conv"] = args.short_conv
        for i in range(config["n_layer"]):   # zero taps: a no-op until trained
            state[f"transformer.h.{i}.short_conv"] = torch.zeros(config["n_embd"], 1, args.short_conv)
    config.update(vocab_size=rows, logit_vocab_size=tokenizer.get_vocab_size())
    state = {k: v.float() for k, v in state.items()}
    model = build_model(config, state, "cpu")

    # 4. where it goes: never over another tokenizer, never over another model
    tag = args.tag or f"d{config['n_layer']}"
    ckpt_dir = os.path.join(out_base, PHASE_DIRS[args.phase], tag)
    out_tok_dir = os.path.join(out_base, "tokenizer")
    os.environ["NANOCHAT_BASE_DIR"] = out_base
    if os.path.exists(os.path.join(get_tokenizer_dir(), "tokenizer.json")):
        existing = Tokenizer.from_directory(get_tokenizer_dir()).fingerprint()
        if existing != tokenizer.fingerprint():
            raise UserError(f"{out_tok_dir} holds another tokenizer ({existing}, this model's is {tokenizer.fingerprint()}): "
                            f"its checkpoints would read these ids as other tokens; pass another --out-base-dir")
    imported_from = {"path": os.path.abspath(source), "step": step, "generation": generation,
                     "format": "transformers" if is_hf else "nanochat", "nanochat_meta": nanochat_meta}
    if os.path.isdir(ckpt_dir) and any(f.startswith("model_") for f in os.listdir(ckpt_dir)):
        metas = sorted(f for f in os.listdir(ckpt_dir) if f.startswith("meta_"))
        old = {}
        if metas:
            with open(os.path.join(ckpt_dir, metas[-1]), encoding="utf-8") as f:
                old = json.load(f).get("imported_from", {})
        if (old.get("path"), old.get("step")) != (imported_from["path"], step):
            raise UserError(f"{ckpt_dir} already holds another model: pass another --tag")

    # 5. write: tokenizer first (a model without its tokenizer is unusable), meta last
    if not os.path.exists(os.path.join(out_tok_dir, "tokenizer.json")):
        tokenizer.save(out_tok_dir)   # file by file through temp names
    meta = {"step": step, "phase": args.phase, "model_config": model.config.to_dict(), "tokenizer": tokenizer.fingerprint(),
            "query_position": "after", "text_prefix": " " if args.phase == "base" else "", "imported_from": imported_from}
    save_checkpoint(ckpt_dir, step, model.state_dict(), None, meta)
    print(f"wrote {out_tok_dir} ({tokenizer.get_vocab_size()} tokens: nanochat's {old_vocab} + "
          f"{tokenizer.get_vocab_size() - old_vocab} document/search tokens; embedding rows padded to {rows})")
    print(f"wrote {ckpt_dir}/model_{step:06d}.pt ({model.num_params():,} parameters, fp32) and meta_{step:06d}.json")
    src = "base" if args.phase == "base" else "sft"
    print(f"next: NANOCHAT_BASE_DIR={out_base} python -m scripts.{'chat_sft' if src == 'base' else 'chat_cli'} "
          f"--source {src} --model-tag {tag}")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        die(str(e))
