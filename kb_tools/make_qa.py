"""
Template questions from a knowledge base's `key: value` lines, for users who have documents but
no question-answer pairs. Every line of a document that looks like `key: value` (or `key = value`,
or a `| key | value |` row) becomes "What is the <key> of <title>?" with the value as the answer,
which is a span of the document. The output is the JSONL that chat_sft / chat_eval --qa read.

    python -m kb_tools.make_qa --kb kb/mine --out my_qa.jsonl [--max-per-doc 4] [--max-value-words 8]

Prose documents have no such lines and give no questions; write a few QA pairs by hand for those.
"""
import os
import re
import json
import random
import argparse

from kb_tools import die

KEY_VALUE = re.compile(r"^\s*\|?\s*([A-Za-z][\w .()/-]{0,39}?)\s*(?::|=|\|)\s+(.+?)\s*\|?\s*$")


def key_values(text, max_value_words):
    """(key, value) pairs of the document's key-value lines, keys as written with '_' read as spaces."""
    pairs = []
    for line in text.split("\n"):
        m = KEY_VALUE.match(line)
        if not m:
            continue
        key, value = m.group(1).strip(), m.group(2).strip().rstrip(".")
        if value and len(value.split()) <= max_value_words and value in line:
            pairs.append((key.replace("_", " ").lower(), value))
    return pairs


def make_questions(documents, max_per_doc, max_value_words, seed=0):
    rng = random.Random(seed)
    rows = []
    for doc in documents:
        title = (doc.get("title") or "").strip()
        if not title:
            continue
        pairs = [(k, v) for k, v in key_values(doc["text"], max_value_words) if v.lower() != title.lower()]
        for key, value in rng.sample(pairs, min(max_per_doc, len(pairs))):
            rows.append({"question": f"What is the {key} of {title}?", "answers": [value],
                         "supporting_ids": [doc["id"]], "type": key})
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kb", required=True, metavar="KB_DIR", help="knowledge base directory (from kb_tools.build_kb)")
    parser.add_argument("--out", required=True, help="QA file to write (JSONL: question, answers, supporting_ids)")
    parser.add_argument("--max-per-doc", type=int, default=4, help="questions per document at most (a seeded sample of its lines)")
    parser.add_argument("--max-value-words", type=int, default=8, help="skip values longer than this (they are sentences, not facts)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.max_per_doc <= 0 or args.max_value_words <= 0:
        die("--max-per-doc and --max-value-words must be positive")
    docs_path = os.path.join(args.kb, "docs.jsonl")
    if not os.path.exists(docs_path):
        die(f"{args.kb}: not a knowledge base (no docs.jsonl); build one with python -m kb_tools.build_kb")
    with open(docs_path, encoding="utf-8") as f:
        documents = [json.loads(line) for line in f if line.strip()]
    rows = make_questions(documents, args.max_per_doc, args.max_value_words, args.seed)
    if not rows:
        die(f"{args.kb}: no document has 'key: value' lines with a title to ask about; nothing written")
    with open(args.out + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {len(rows)} questions about {len({r['supporting_ids'][0] for r in rows})} of {len(documents)} documents to {args.out}")
