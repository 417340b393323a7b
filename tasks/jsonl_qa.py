"""
Bring-your-own QA: one JSON object per line,
    {"question": str, "answers": [str, ...], "supporting_ids": [doc id, ...], "hops": [doc id, ...]}
supporting_ids (the documents that hold the answer) and hops (the same, in the order a reader
needs them, for multi-hop questions) are optional and name documents of a KB built with
`python -m kb_tools.build_kb`. An optional "queries" list gives the search to write for each hop. Wrap it in tasks.rag.RAGTask / MultiHopRAGTask to retrieve.
"""
import json
import zlib

from tasks.common import Task
from nanochat.common import UserError
from nanochat.rag import answer_text, exact_match, f1_score, qa_reward


def read_qa_jsonl(path):
    """Validated rows; any problem is a UserError naming file:line."""
    rows = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise UserError(f"{path}: cannot read QA file ({e.strerror})") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not row["question"].strip():
                raise UserError(f"{where}: needs a non-empty string 'question'")
            answers = row.get("answers")
            if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
                raise UserError(f"{where}: 'answers' must be a non-empty list of non-empty strings")
            for key in ("supporting_ids", "hops"):
                ids = row.get(key, [])
                if not isinstance(ids, list) or not all(isinstance(i, (str, int)) for i in ids):
                    raise UserError(f"{where}: '{key}' must be a list of document ids")
                row[key] = [str(i) for i in ids]
            queries = row.get("queries")
            if queries is not None and (not isinstance(queries, list) or len(queries) != len(row["hops"])
                                        or not all(isinstance(q, str) and q.strip() for q in queries)):
                raise UserError(f"{where}: 'queries' must be one non-empty string per hop")
            row["line"] = lineno   # for errors found later (a gold id missing from the KB)
            rows.append(row)
    if not rows:
        raise UserError(f"{path}: no questions in QA file")
    return rows


def split_by_document(rows, heldout_frac, seed=0):
    """(train rows, held-out rows): whole documents are held out, so every held-out question is
    about documents no training question touches. A document is held out by a seeded hash of its
    id; a question goes to held-out if any of its documents is held out, and a question with no
    supporting_ids is split by a hash of its text. A training question that shares any document
    with a held-out one moves to held-out too, so the two sides never share a document."""
    def held(key):
        return zlib.crc32(f"{seed}-{key}".encode()) % 10_000 < heldout_frac * 10_000

    train, heldout = [], []
    for row in rows:
        ids = row["supporting_ids"] or row["hops"]
        out = any(held(i) for i in ids) if ids else held(row["question"])
        (heldout if out else train).append(row)
    def docs(row):
        return set(row["supporting_ids"] + row["hops"])

    while True:   # multi-document questions can chain: move until nothing is shared
        heldout_docs = set().union(*map(docs, heldout)) if heldout else set()
        moved = [row for row in train if docs(row) & heldout_docs]
        if not moved:
            return train, heldout
        train = [row for row in train if not docs(row) & heldout_docs]
        heldout += moved


class JsonlQA(Task):
    """metric: 'em' (exact match) or 'f1', used by evaluate and by the reward's answer term.
    split: None (every question), or 'train' / 'heldout' of split_by_document(heldout_frac)."""

    def __init__(self, path, metric="em", split=None, heldout_frac=0.2, seed=0, **kwargs):
        super().__init__(**kwargs)
        assert metric in ("em", "f1"), f"metric must be em or f1, got {metric!r}"
        assert split in (None, "train", "heldout"), f"split must be None, train or heldout, got {split!r}"
        self.rows, self.metric = read_qa_jsonl(path), metric
        if split is not None:
            train, heldout = split_by_document(self.rows, heldout_frac, seed)
            self.rows = train if split == "train" else heldout
            if not self.rows:
                raise UserError(f"{path}: the {split} split by document is empty ({len(train)} training, "
                                f"{len(heldout)} held-out questions): the file needs questions about more documents")

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        example = {"messages": [{"role": "user", "content": row["question"]},
                                {"role": "assistant", "content": row["answers"][0]}],
                   "answers": row["answers"], "supporting_ids": row["supporting_ids"]}
        if row["hops"]:
            example["hops"] = row["hops"]
        if row.get("queries"):
            example["queries"] = row["queries"]
        if isinstance(row.get("type"), str):
            example["type"] = row["type"]   # reports break results down by it
        return example

    def evaluate(self, conversation, completion):
        score = exact_match if self.metric == "em" else f1_score
        return score(answer_text(completion), conversation["answers"])

    def reward(self, conversation, completion):
        return qa_reward(completion, conversation["answers"], metric=self.metric)
