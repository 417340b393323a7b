"""
The Task API: a dataset of conversations as a lazy, sliceable view, plus mixtures and
sequences of tasks, and the one place that fetches Hugging Face datasets as parquet files.

A task example is a dict {"messages": [...], ...} in the format render_conversation knows;
other keys (letters, answers, hops, ...) ride along for evaluation.
"""
import os
from abc import ABC, abstractmethod
import glob
import math
import random
from fractions import Fraction

from nanochat.common import get_base_dir, UserError


class Task(ABC):
    """Base class. Subclasses implement num_examples, get_example and eval_type; tasks with gold
    answers also implement evaluate(conversation, completion) (chat data and mixtures have none).
    start/stop/step give a view on the underlying examples without copying anything."""

    def __init__(self, start=0, stop=None, step=1):
        assert start >= 0, f"start must be non-negative, got {start}"
        assert stop is None or stop >= start, f"stop must be >= start, got {start}, {stop}"
        assert step >= 1, f"step must be positive, got {step}"
        self.start, self.stop, self.step = start, stop, step

    @property
    @abstractmethod
    def eval_type(self):
        """'generative' or 'categorical'"""

    @abstractmethod
    def num_examples(self):
        """How many examples the underlying dataset has."""

    @abstractmethod
    def get_example(self, index):
        """The example at a physical index: {"messages": [...], ...}."""

    def reward(self, conversation, completion):
        """Scalar for RL; by default the evaluation outcome."""
        return float(self.evaluate(conversation, completion))

    def prefetch(self, indices):
        """Hint that the examples at these (view) indices come next. Tasks that do expensive
        work per example (retrieval) do it here in one batch; for the others it is free."""

    def physical_index(self, index):
        return self.start + index * self.step

    def __len__(self):
        stop = self.num_examples() if self.stop is None else self.stop
        return max(0, (stop - self.start + self.step - 1) // self.step)

    def __getitem__(self, index):
        assert isinstance(index, int), f"index must be an int, got {type(index)}"
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a task of {len(self)} examples")
        return self.get_example(self.physical_index(index))


PREFETCH_WINDOW = 256   # mixtures tell their tasks this many upcoming examples at a time
MAX_BLOCK = 10_000      # weights in no simple ratio are rounded to multiples of 1/MAX_BLOCK


def block_quotas(weights):
    """Draws per block of a weighted mixture, one whole number per weight: the weights' own
    ratio when it is a simple one (1:3 -> [1, 3]; 0.5, 0.3, 0.2 -> [5, 3, 2]), else shares of
    MAX_BLOCK, at least one each (a task that was asked for is never rounded away)."""
    if not weights or not all(0 < w < math.inf for w in weights):
        raise ValueError(f"mixture weights must be positive numbers, got {list(weights)}")
    total = sum(weights)
    shares = [Fraction(w / total).limit_denominator(MAX_BLOCK) for w in weights]
    block = math.lcm(*(s.denominator for s in shares))
    if all(shares) and sum(shares) == 1 and block <= MAX_BLOCK:
        return [int(s * block) for s in shares]
    return [max(1, round(w / total * MAX_BLOCK)) for w in weights]


class TaskMixture(Task):
    """Examples of several tasks in one deterministic stream.

    Without weights: every example of every task once, shuffled together with Random(seed).

    With weights (proportions, normalised): each task takes its weight's share of the draws
    whatever its size, so 439 questions mixed 1:1 with a 200,000-example stream are half of
    what is trained on. Draws come in blocks holding exactly block_quotas(weights) draws of
    each task, so over any prefix a task's count is off its share by less than its quota (1:3
    -> blocks of 4). Within a block the order is a fresh seeded shuffle, not a fixed
    interleaving: ranks read draws r, r+W, ..., and from t0,t1,t0,t1 two ranks would each see
    one task only. Task t's j-th draw is step j % n of its pass j // n, each pass a new seeded
    shuffle of its n examples: a small task shows every example before any twice, in a new
    order each pass; a large one is a shuffled walk it never finishes. Everything is a function
    of the index (no cursors), so ranks and resumed runs agree. len() is one epoch: the fewest
    draws in which every task shows each of its examples (a loader wrapping at len repeats it).

    Walking a mixture in order prefetches each child task's upcoming examples in blocks, so
    retrieval-backed tasks get batched queries even though their indices arrive shuffled."""

    def __init__(self, tasks, weights=None, seed=42, **kwargs):
        super().__init__(**kwargs)
        self.tasks, self.seed = tasks, seed
        self._window = range(0)   # physical indices whose prefetch hint was already given
        if weights is None:
            self.index_map = [(t, i) for t, task in enumerate(tasks) for i in range(len(task))]
            random.Random(seed).shuffle(self.index_map)
            return
        if len(weights) != len(tasks):
            raise ValueError(f"a mixture of {len(tasks)} tasks needs {len(tasks)} weights, got {len(weights)}")
        for t, task in enumerate(tasks):
            if len(task) == 0:
                raise ValueError(f"task {t} of the mixture ({type(task).__name__}) has no examples")
        self.index_map = None
        self.quotas = block_quotas(weights)
        self.block = sum(self.quotas)
        self._blocks = {}                     # block -> (task of each draw, its count within the block)
        self._perms = [{} for _ in tasks]     # per task: pass -> order of its examples
        self.total = 1 + max(self._draw_index(t, len(task) - 1) for t, task in enumerate(tasks))

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return len(self.index_map) if self.index_map is not None else self.total

    def _block_order(self, b):
        if b not in self._blocks:
            order = [t for t, q in enumerate(self.quotas) for _ in range(q)]
            random.Random(f"{self.seed}-block-{b}").shuffle(order)
            seen, rank = [0] * len(self.quotas), []
            for t in order:
                rank.append(seen[t])
                seen[t] += 1
            if len(self._blocks) >= 8:
                del self._blocks[next(iter(self._blocks))]   # the oldest: walks go forward
            self._blocks[b] = (order, rank)
        return self._blocks[b]

    def _permutation(self, t, p):
        """Order in which task t's pass p walks its examples (two passes kept per task)."""
        cache = self._perms[t]
        if p not in cache:
            perm = list(range(len(self.tasks[t])))
            random.Random(f"{self.seed}-{t}-{p}").shuffle(perm)
            if len(cache) >= 2:
                del cache[min(cache)]
            cache[p] = perm
        return cache[p]

    def _draw_index(self, t, j):
        """The physical index of task t's j-th draw."""
        b, r = divmod(j, self.quotas[t])
        order, rank = self._block_order(b)
        pos = next(k for k in range(self.block) if order[k] == t and rank[k] == r)
        return b * self.block + pos

    def _locate(self, index):
        """(task, index within that task) of a physical index."""
        if self.index_map is not None:
            return self.index_map[index]
        b, pos = divmod(index, self.block)
        order, rank = self._block_order(b)
        t = order[pos]
        j = b * self.quotas[t] + rank[pos]           # task t's j-th draw
        p, k = divmod(j, len(self.tasks[t]))         # step k of its pass p
        return t, self._permutation(t, p)[k]

    def task_index_at(self, index):
        """Which child task (its position in the mixture) example `index` comes from."""
        return self._locate(self.physical_index(index))[0]

    def task_at(self, index):
        """The task example `index` comes from, inside a nested mixture too (RL scores an answer with
        its own task: single-hop abstainN is itself a mixture)."""
        t, local = self._locate(self.physical_index(index))
        task = self.tasks[t]
        return task.task_at(local) if hasattr(task, "task_at") else task

    def _prefetch_physical(self, indices):
        by_task = {}
        for i in indices:
            t, local = self._locate(i)
            by_task.setdefault(t, []).append(local)
        for t, local in by_task.items():
            self.tasks[t].prefetch(local)

    def prefetch(self, indices):
        # a parent mixture's hint: these are the indices coming, not a window from the first of them
        # (a nested mixture's indices arrive shuffled; a window of 256 from each built 255 unused examples)
        physical = [self.physical_index(i) for i in indices]
        self._prefetch_physical(physical)
        self._window = set(physical)

    def get_example(self, index):
        if index not in self._window:
            self._window = range(index, min(index + PREFETCH_WINDOW, self.num_examples()))
            self._prefetch_physical(self._window)
        t, local = self._locate(index)
        return self.tasks[t][local]


class TaskSequence(Task):
    """Tasks one after the other, unshuffled: a curriculum."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = tasks
        self.offsets = []
        total = 0
        for task in tasks:
            self.offsets.append(total)
            total += len(task)
        self.total = total

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return self.total

    def _locate(self, index):
        for t in reversed(range(len(self.tasks))):
            if index >= self.offsets[t]:
                return t, index - self.offsets[t]
        raise IndexError(index)

    def prefetch(self, indices):
        by_task = {}
        for i in indices:
            t, local = self._locate(self.physical_index(i))
            by_task.setdefault(t, []).append(local)
        for t, local in by_task.items():
            self.tasks[t].prefetch(local)

    def get_example(self, index):
        t, local = self._locate(index)
        return self.tasks[t][local]


def render_mc(question, letters, choices):
    """A multiple-choice question as a user message. The letter comes right after each choice
    ("- Paris=A") so that a small model sees the letter next to the text it names."""
    query = f"Multiple Choice question: {question}\n"
    query += "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices))
    query += "\nRespond only with the letter of the correct answer."
    return query


# -----------------------------------------------------------------------------
# Hugging Face datasets without the `datasets` library: the Hub serves every public dataset
# as parquet files (the auto-converted "refs/convert/parquet" branch), listed by one API call.
# Local layout, for downloads and for hand-placed files alike: ROOT/{config}/{split}/*.parquet

HF_API = "https://huggingface.co/api/datasets"


def hf_parquet_files(repo, config, split, data_dir=None):
    """Paths of the parquet files of one split. With data_dir, read only what is there
    (tests, offline users); without, download once into $NANOCHAT_BASE_DIR/hf_datasets."""
    root = data_dir or os.path.join(get_base_dir(), "hf_datasets", repo.replace("/", "__"))
    folder = os.path.join(root, config, split)
    files = sorted(glob.glob(os.path.join(folder, "*.parquet")))
    if files or data_dir:
        if not files:
            raise UserError(f"no parquet files in {folder} (expected {{config}}/{{split}}/*.parquet under {data_dir})")
        return files
    import requests
    try:
        resp = requests.get(f"{HF_API}/{repo}/parquet/{config}/{split}", timeout=30)
        resp.raise_for_status()
        urls = resp.json()
        os.makedirs(folder, exist_ok=True)
        for k, url in enumerate(urls):
            path = os.path.join(folder, f"{k:04d}.parquet")
            with requests.get(url, stream=True, timeout=60) as r:
                r.raise_for_status()
                with open(path + ".tmp", "wb") as f:
                    for chunk in r.iter_content(1 << 20):
                        f.write(chunk)
            os.replace(path + ".tmp", path)   # a killed download never looks complete
    except (requests.RequestException, ValueError) as e:
        raise UserError(f"could not download {repo} ({config}/{split}) from huggingface.co "
                        f"({type(e).__name__}); offline? put its parquet files in {folder} or pass data_dir") from None
    return sorted(glob.glob(os.path.join(folder, "*.parquet")))


class ParquetRows:
    """Random access to the rows of parquet files as dicts, converting one row at a time
    (turning 500k SmolTalk conversations into Python objects up front takes minutes)."""

    def __init__(self, files):
        import pyarrow.parquet as pq
        import pyarrow as pa
        self.table = pa.concat_tables([pq.read_table(f) for f in files]).combine_chunks()
        self.columns = {name: self.table.column(name) for name in self.table.column_names}

    def __len__(self):
        return self.table.num_rows

    def __getitem__(self, i):
        return {name: col[i].as_py() for name, col in self.columns.items()}
