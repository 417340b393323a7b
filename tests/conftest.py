"""Shared fixtures: a tiny tokenizer and a tiny parquet corpus, both made here, never downloaded."""
import os
import random
import tempfile

import pytest

from nanochat.tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# every test and the processes it starts share one scan of the machine's real text (~2 minutes
# each otherwise: the reading drills' words come from it); it is keyed by its roots and their mtimes
os.environ.setdefault("NANOCHAT_REALTEXT_CACHE", os.path.join(tempfile.gettempdir(), "nanochat-rag-tests-realtext"))
WORDS = ("the a cat dog sat ran on under over mat house river city old new red blue green king queen "
         "born lived wrote built in of and was is founded company author year capital").split()


def make_text(rng, n_words):
    return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."


@pytest.fixture(scope="session")
def tokenizer():
    rng = random.Random(0)
    texts = [make_text(rng, 60) for _ in range(300)] + ["Numbers 0123456789, punctuation: (x) [1] 'quotes' \"q\"!?"]
    return Tokenizer.train_from_iterator(iter(texts), 400)


@pytest.fixture(scope="session")
def parquet_dir(tmp_path_factory):
    """Three small shards in FineWeb-Edu's layout (a `text` column): two train, one validation."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    d = tmp_path_factory.mktemp("parquet")
    rng = random.Random(1)
    for s in range(3):
        docs = [make_text(rng, rng.randint(30, 300)) for _ in range(300)]
        pq.write_table(pa.table({"text": docs}), str(d / f"shard_{s:05d}.parquet"), row_group_size=100)
    return str(d)


def run_module(module, *args, base_dir, timeout=600, extra_env=None, torchrun_procs=0):
    """Run `python -m module args` (or torchrun) with its own NANOCHAT_BASE_DIR; returns CompletedProcess."""
    import subprocess
    import sys
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra_env or {})
    if torchrun_procs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun_procs}", "-m", module, *args]
    else:
        cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


TINY_MODEL = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64",
              "--device-batch-size", "4", "--eval-every", "0", "--eval-tokens", "1024", "--sample-every", "0",
              "--no-compile"]   # base_train compiles by default; tests stay fast


@pytest.fixture(scope="session")
def trained_base(tmp_path_factory, parquet_dir):
    """A NANOCHAT_BASE_DIR with a tokenizer and a 20-step base model tagged 'tiny' (context 64)."""
    d = tmp_path_factory.mktemp("nanochat_base")
    for module, *args in (("scripts.tok_train", "--data", parquet_dir, "--vocab-size", "400", "--max-chars", "300000"),
                          ("scripts.base_train", *TINY_MODEL, "--data", parquet_dir, "--num-iterations", "20",
                           "--model-tag", "tiny")):
        proc = run_module(module, *args, base_dir=d)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return d
