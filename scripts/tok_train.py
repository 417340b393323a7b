"""
Train the BPE tokenizer (rustbpe) on pretraining text and save it for tiktoken.

    python -m scripts.tok_train                       # embedded offline corpus
    python -m scripts.tok_train --data embedded+realtext   # plus real English found on this machine
    python -m scripts.tok_train --data fineweb --max-chars 2000000000 --vocab-size 32768

At the end it prints tokens per word on the validation text of both offline corpora (also saved in
tokenizer/report.json), so tokenizers trained on different --data compare on real English.
"""
import os
import time
import argparse

import torch

from nanochat.common import get_base_dir, die, print0, atomic_write_json
from tasks.pretraining import GENERATED
from nanochat.dataset import get_source, iter_texts
from nanochat.tokenizer import Tokenizer, SPECIAL_TOKENS

parser = argparse.ArgumentParser(description="Train the BPE tokenizer (rustbpe) and save it under $NANOCHAT_BASE_DIR/tokenizer")
parser.add_argument("--data", default="embedded",
                    help="'embedded' (offline generated corpus), 'realtext' (docstrings and docs on this machine), 'fineweb' "
                         "(downloaded shards), a directory of parquet files, or a mix such as 'embedded:3+realtext:1'")
parser.add_argument("--max-chars", type=int, default=20_000_000, help="characters of text to train on")
parser.add_argument("--doc-cap", type=int, default=10_000, help="characters kept from each document (long documents skew pair counts)")
parser.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size including the special tokens")
args = parser.parse_args()
if args.vocab_size < 256 + len(SPECIAL_TOKENS):
    die(f"--vocab-size must be at least {256 + len(SPECIAL_TOKENS)}, got {args.vocab_size}")
if args.max_chars <= 0 or args.doc_cap <= 0:
    die("--max-chars and --doc-cap must be positive")

try:
    source, val_source = get_source(args.data, "train", generated=GENERATED), get_source(args.data, "val", generated=GENERATED)
except (ValueError, FileNotFoundError, ImportError) as e:
    die(str(e))


total_chars = 0


def texts():
    global total_chars
    for text in iter_texts(source, args.max_chars):
        total_chars += len(text[:args.doc_cap])
        yield text[:args.doc_cap]


t0 = time.time()
tokenizer = Tokenizer.train_from_iterator(texts(), args.vocab_size)
if total_chars == 0:
    die(f"the {args.data} corpus is empty: nothing to train the tokenizer on")
print0(f"trained a {tokenizer.get_vocab_size()}-token tokenizer in {time.time() - t0:.1f}s")
if tokenizer.get_vocab_size() < args.vocab_size:
    print0(f"note: the corpus only supported {tokenizer.get_vocab_size()} tokens (asked {args.vocab_size})")

out_dir = os.path.join(get_base_dir(), "tokenizer")
tokenizer.save(out_dir)
print0(f"saved to {out_dir}")

# quick report: compression on held-out text, and a round trip
sample = "".join(iter_texts(val_source, 200_000))
ids = tokenizer.encode(sample)
assert tokenizer.decode(ids) == sample, "tokenizer round trip failed"
bytes_per_token = len(sample.encode('utf-8')) / max(1, len(ids))
print0(f"validation compression: {bytes_per_token:.2f} bytes/token")
token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.int32)
print0(f"token bytes: min {int(token_bytes[token_bytes > 0].min())}, mean {token_bytes[token_bytes > 0].float().mean():.2f}, max {int(token_bytes.max())}")


def tokens_per_word(name, max_chars=500_000):
    """Tokens per word on a source's validation documents, each encoded as documents are read in a
    conversation (encode_text: with the leading space). A word is a whitespace-separated piece."""
    docs = list(iter_texts(get_source(name, "val", generated=GENERATED), max_chars))
    tokens = sum(len(tokenizer.encode_text(d)) for d in docs)
    return tokens / max(1, sum(len(d.split()) for d in docs))


# a tokenizer that has only seen the invented world shreds real words: this shows by how much
report = {"data": args.data, "vocab_size": tokenizer.get_vocab_size(), "train_chars": total_chars,
          "val_bytes_per_token": round(bytes_per_token, 4), "tokens_per_word": {}}
for name in ("embedded", "realtext"):
    try:
        report["tokens_per_word"][name] = round(tokens_per_word(name), 4)
        print0(f"tokens per word on {name} val: {report['tokens_per_word'][name]:.3f}")
    except (ValueError, FileNotFoundError) as e:
        print0(f"tokens per word on {name} val: skipped ({e})")
atomic_write_json(os.path.join(out_dir, "report.json"), report)
