"""
Bring-your-own QA: one JSON object per line,
    {"question": str, "answers": [str, ...], "supporting_ids": [doc id, ...], "hops": [doc id, ...]}
supporting_ids (the documents that hold the answer) and hops (the same, in the order a reader
needs them, for multi-hop questions) are optional and name documents of a KB built with
`python -m kb_tools.build_kb`. An optional "queries" list gives the search to write for each hop. Wrap it in tasks.rag.RAGTask / MultiHopRAGTask to retrieve.
"""
import json

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
            rows.append(row)
    if not rows:
        raise UserError(f"{path}: no questions in QA file")
    return rows


class JsonlQA(Task):
    """metric: 'em' (exact match) or 'f1', used by evaluate and by the reward's answer term."""

    def __init__(self, path, metric="em", **kwargs):
        super().__init__(**kwargs)
        assert metric in ("em", "f1"), f"metric must be em or f1, got {metric!r}"
        self.rows, self.metric = read_qa_jsonl(path), metric

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
        return example

    def evaluate(self, conversation, completion):
        score = exact_match if self.metric == "em" else f1_score
        return score(answer_text(completion), conversation["answers"])

    def reward(self, conversation, completion):
        return qa_reward(completion, conversation["answers"], metric=self.metric)
