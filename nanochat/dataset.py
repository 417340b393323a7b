"""
Pretraining text sources, each addressable by document index (so a run resumes exactly and
torchrun ranks take disjoint documents without coordination):

- "embedded": the offline default. Generated on the fly by tasks.knowledge_world: encyclopedia
  articles about invented entities followed by questions answered from them. License-clean,
  never repeats, needs no download.
- "fineweb": FineWeb-Edu parquet shards for users who are online
  (`python -m nanochat.dataset -n 8` downloads 8 shards). The last shard is the validation split.
"""
import os
import argparse
import time

from nanochat.common import get_base_dir

FINEWEB_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_{:05d}.parquet"
FINEWEB_MAX_SHARD = 1822
VAL_OFFSET = 1_000_000_007   # embedded validation documents come from a disjoint index range


class EmbeddedSource:
    """Generated pretraining documents: document i is a pure function of (i, split)."""
    name = "embedded"

    def __init__(self, split="train"):
        from tasks.knowledge_world import pretraining_documents
        self._documents = pretraining_documents
        self.offset = VAL_OFFSET if split == "val" else 0

    def __len__(self):
        return 10 ** 9   # effectively endless

    def get(self, i):
        # each index seeds its own little world, so any document can be made without the ones before it
        return next(iter(self._documents(self.offset + i)))


class ParquetSource:
    """Documents in a directory of parquet files with a `text` column, indexed across files."""
    name = "parquet"

    def __init__(self, data_dir, split="train"):
        import pyarrow.parquet as pq
        if not os.path.isdir(data_dir):
            raise FileNotFoundError(f"no parquet directory {data_dir} (download shards: python -m nanochat.dataset -n 8)")
        files = sorted(os.path.join(data_dir, f) for f in os.listdir(data_dir) if f.endswith(".parquet"))
        if len(files) < 2:
            raise ValueError(f"{data_dir} needs at least 2 parquet files (the last one is the validation split), found {len(files)}")
        files = files[-1:] if split == "val" else files[:-1]
        self.groups = []   # (file, row_group, first_doc_index, num_rows)
        total = 0
        for path in files:
            try:
                meta = pq.ParquetFile(path).metadata
            except Exception as e:
                raise ValueError(f"{path}: not a readable parquet file ({e})") from None
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                self.groups.append((path, g, total, n))
                total += n
        if total == 0:
            raise ValueError(f"{data_dir}: the {split} parquet files hold no documents")
        self.total = total
        self._cached = (None, None)

    def __len__(self):
        return self.total

    def get(self, i):
        import bisect
        import pyarrow.parquet as pq
        i %= self.total   # wrap around: more epochs
        k = bisect.bisect_right([g[2] for g in self.groups], i) - 1
        path, g, first, _ = self.groups[k]
        if self._cached[0] != (path, g):
            table = pq.ParquetFile(path).read_row_group(g, columns=["text"])
            self._cached = ((path, g), table.column("text").to_pylist())
        return self._cached[1][i - first]


def get_source(name, split="train", data_dir=None):
    if name == "embedded":
        return EmbeddedSource(split)
    if name == "fineweb":
        return ParquetSource(data_dir or os.path.join(get_base_dir(), "base_data"), split)
    if os.path.isdir(name):
        return ParquetSource(name, split)
    raise ValueError(f"--data must be 'embedded', 'fineweb' or a directory of parquet files, got {name!r}")


def iter_texts(source, max_chars, start=0):
    """Documents from a source until max_chars characters have been yielded (tokenizer training)."""
    chars = 0
    for i in range(start, len(source)):
        if chars >= max_chars:
            return
        text = source.get(i)
        chars += len(text)
        yield text


def download_shard(index, data_dir, attempts=5):
    import requests
    path = os.path.join(data_dir, f"shard_{index:05d}.parquet")
    if os.path.exists(path):
        return path
    url = FINEWEB_URL.format(index)
    for attempt in range(1, attempts + 1):
        try:
            with requests.get(url, stream=True, timeout=30) as r:
                r.raise_for_status()
                tmp = path + ".tmp"
                with open(tmp, "wb") as f:
                    for chunk in r.iter_content(chunk_size=1 << 20):
                        f.write(chunk)
            os.replace(tmp, path)
            return path
        except Exception as e:
            if attempt == attempts:
                raise RuntimeError(f"could not download {url}: {e}") from None
            time.sleep(2 ** attempt)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Download FineWeb-Edu pretraining shards (~100 MB each) into $NANOCHAT_BASE_DIR/base_data")
    parser.add_argument("-n", "--num-shards", type=int, default=8, help="number of shards to download (the last one is used for validation)")
    parser.add_argument("--data-dir", default=None, help="target directory (default: $NANOCHAT_BASE_DIR/base_data)")
    args = parser.parse_args()
    if not 2 <= args.num_shards <= FINEWEB_MAX_SHARD + 1:
        parser.error(f"--num-shards must be between 2 and {FINEWEB_MAX_SHARD + 1}")
    data_dir = args.data_dir or os.path.join(get_base_dir(), "base_data")
    os.makedirs(data_dir, exist_ok=True)
    from tqdm import tqdm
    for i in tqdm(range(args.num_shards), desc="shards"):
        download_shard(i, data_dir)
    print(f"{args.num_shards} shards in {data_dir}")
