"""
Export this project's offline pretraining text as parquet shards in the layout karpathy/nanochat's
own dataloader reads, so nanochat's scripts.tok_train and scripts.base_train can train on exactly
the mix our CPU base model sees (the import comparison in docs/nanochat-import.md).

The text is the stream our scripts/tok_train.py and scripts/base_train.py read: get_source(--data)
with tasks.pretraining.GENERATED, documents in index order from 0 (iter_texts), train split into
the train shards and the val split into the last shard. nanochat (nanochat/dataset.py,
dataloader.py) reads every *.parquet file in $NANOCHAT_BASE_DIR/base_data_climbmix in sorted
order, a `text` column row group by row group, and takes the LAST file as its validation split:

    base_data_climbmix/shard_00000.parquet ... shard_0000{n-1}.parquet   train, in stream order
    base_data_climbmix/shard_0000{n}.parquet                              val (our val split)

So nanochat's tokenizer, trained on the first --max-chars of its train shards, sees the same
documents as ours. nanochat's base_train packs documents best-fit and throws away the crop of any
document longer than a row, so it consumes more text per token than our loader: export a few
times the 1000 steps x 4096 tokens (~4 chars a token) our CPU base model trains on.

Run from the repository root with this project's venv (realtext reads that venv's docstrings, so
another Python would give other documents):

    NANOCHAT_BASE_DIR=/work/nanochat_run .venv/bin/python -m bench.export_pretraining_parquet
"""
import os
import time
import argparse

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import get_base_dir
from nanochat.dataset import get_source, iter_texts
from tasks.pretraining import GENERATED

parser = argparse.ArgumentParser(description="write this project's pretraining mix as nanochat parquet shards")
parser.add_argument("--data", default="embedded:1+realtext:1+reading:1",
                    help="the --data mix, as base_train/tok_train take it (default: the CPU speedrun's)")
parser.add_argument("--max-chars", type=int, default=40_000_000, help="characters of train text to export")
parser.add_argument("--val-chars", type=int, default=2_000_000,
                    help="characters of val text for the last shard (the CPU mix's val split holds ~2M in all)")
parser.add_argument("--chars-per-shard", type=int, default=10_000_000, help="train characters per shard file")
parser.add_argument("--row-group-size", type=int, default=1024, help="documents per parquet row group (nanochat's: 1024)")
parser.add_argument("--out-dir", default=None, help="default: $NANOCHAT_BASE_DIR/base_data_climbmix, where nanochat looks")
args = parser.parse_args()
for flag in ("max_chars", "val_chars", "chars_per_shard", "row_group_size"):
    if getattr(args, flag) <= 0:
        parser.error(f"--{flag.replace('_', '-')} must be positive")

out_dir = args.out_dir or os.path.join(get_base_dir(), "base_data_climbmix")
if os.path.isdir(out_dir) and any(f.endswith(".parquet") for f in os.listdir(out_dir)):
    # nanochat reads every parquet file there: old shards would silently join the mix
    parser.error(f"{out_dir} already holds parquet files; remove them or pick another --out-dir")
os.makedirs(out_dir, exist_ok=True)


def write_shard(index, docs):
    path = os.path.join(out_dir, f"shard_{index:05d}.parquet")
    table = pa.Table.from_pydict({"text": docs})
    pq.write_table(table, path + ".tmp", row_group_size=args.row_group_size, compression="zstd")
    os.replace(path + ".tmp", path)   # nanochat skips *.tmp, so a killed export leaves no half shard
    print(f"{path}: {len(docs):,} documents, {sum(len(d) for d in docs):,} chars")


t0 = time.time()
train, val = get_source(args.data, "train", generated=GENERATED), get_source(args.data, "val", generated=GENERATED)
shard, docs, chars, total = 0, [], 0, 0
for text in iter_texts(train, args.max_chars):
    docs.append(text)
    chars += len(text)
    if chars >= args.chars_per_shard:
        write_shard(shard, docs)
        shard, total, docs, chars = shard + 1, total + chars, [], 0
if docs:
    write_shard(shard, docs)
    shard, total = shard + 1, total + chars
if total < args.max_chars:
    print(f"warning: the train split ran out after {total:,} chars (--max-chars {args.max_chars:,})")
val_docs = list(iter_texts(val, args.val_chars))
write_shard(shard, val_docs)   # the last file: nanochat's validation split
print(f"{shard} train shard(s) + 1 val shard in {out_dir} ({time.time() - t0:.0f}s)")
