"""
Retriever training benchmark: what scripts/retriever_train.py costs and gains on a CPU.

    python -m bench.bench_retriever_train --source sft --model-tag d4       # NANOCHAT_BASE_DIR: a speedrun's run dir

Part 1, LSR teacher cost: candidates/s of the chat model scoring (document, question, answer)
rows (nanochat.retriever_training.answer_scores), at the batch size retriever_train uses.
Part 2, a full LSR run: ~2,000 descriptive questions of the held-out knowledge world x 8
candidates, wall time (issue target: <= 10 minutes on 2 cores) and held-out Recall@1 before/after.
Part 3, a second, real corpus: docstrings of the installed standard library / numpy / scipy / torch
(bench/corpora.py). Query: a docstring's first sentence; document: the rest of it (so the words of
the query are not simply in the document). `contrastive` training on the queries of 80% of the
documents; held-out nDCG@10 of the other 20% against base MiniLM and BM25.
Runs one after the other; every number is printed as it comes and in a table at the end.
"""
import os
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import re
import sys
import json
import time
import random
import argparse
import tempfile
import subprocess

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--source", default="sft", choices=["base", "sft", "rl"], help="teacher checkpoint (parts 1-2)")
parser.add_argument("--model-tag", default=None, help="teacher model tag (default: the latest)")
parser.add_argument("--score-rows", type=int, default=2000, help="part 1: rows scored")
parser.add_argument("--lsr-questions", type=int, default=2000, help="part 2: descriptive questions")
parser.add_argument("--docstrings", type=int, default=3000, help="part 3: documents (MiniLM encodes ~30/s on 2 cores)")
parser.add_argument("--steps", type=int, default=300, help="parts 2-3: most training steps")
parser.add_argument("--skip", default="", help="comma list of parts to skip: 1,2,3")
args = parser.parse_args()
skip = {s.strip() for s in args.skip.split(",") if s.strip()}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
work = tempfile.mkdtemp(prefix="bench_retriever_")
rows = []


def row(measure, value, note=""):
    rows.append((measure, value, note))
    print(f"  {measure}: {value} {note}", flush=True)


def train(*argv):
    """scripts.retriever_train as a user runs it; returns (seconds, its last line)."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "scripts.retriever_train", *argv], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"retriever_train failed:\n{proc.stderr[-3000:]}")
    return time.time() - t0, proc.stdout.strip().splitlines()[-1]


def build(docs_path, out):
    from nanochat.retrieval.kb import build_kb
    build_kb([docs_path], out, show_progress=False, log=lambda *a: None)


from tasks.knowledge_world import heldout_world  # noqa: E402

world = heldout_world()
world_docs = os.path.join(work, "world_kb.jsonl")
world.write_kb_input(world_docs)
world_qa = os.path.join(work, "world_qa.jsonl")
world.write_qa(world_qa, args.lsr_questions, descriptive=True)

if "1" not in skip:
    print("part 1: LSR teacher scoring throughput")
    import torch
    from nanochat.checkpoint_manager import load_model, find_model_tag
    from nanochat.retriever_training import answer_scores
    tag = args.model_tag or find_model_tag(args.source)
    model, tokenizer, _ = load_model(args.source, torch.device("cpu"), model_tag=tag)
    model.eval()
    docs = world.documents()
    qa = [json.loads(line) for line in open(world_qa)]
    rng = random.Random(0)
    items = [(q["question"], q["answers"][0], rng.choice(docs)) for q in (rng.choice(qa) for _ in range(args.score_rows))]
    answer_scores(model, tokenizer, items[:64], "cpu")   # warm-up
    t0 = time.time()
    answer_scores(model, tokenizer, items, "cpu")
    dt = time.time() - t0
    row("LSR candidate scoring", f"{len(items) / dt:,.0f} candidates/s",
        f"({args.source}/{tag}, {model.config.block_pattern}, {model.num_params():,} params, batch 32, {torch.get_num_threads()} threads)")

if "2" not in skip:
    print(f"part 2: a full LSR run, {args.lsr_questions} descriptive questions x 8 candidates")
    build(world_docs, os.path.join(work, "world_kb"))
    seconds, last = train("--kb", os.path.join(work, "world_kb"), "--qa", world_qa, "--objective", "lsr", "--source",
                          args.source, *(["--model-tag", args.model_tag] if args.model_tag else []),
                          "--steps", str(args.steps), "--no-save")
    row("LSR run, wall time", f"{seconds / 60:.1f} min", "(KB load, pools, teacher scores, training, evaluations)")
    m = re.search(r"R@1 ([\d.]+) -> ([\d.]+)", last)
    row("LSR held-out Recall@1", f"{m.group(1)} -> {m.group(2)}" if m else last, "(base MiniLM -> trained query encoder)")

if "3" not in skip:
    print(f"part 3: contrastive on {args.docstrings} docstrings (first sentence -> the rest)")
    from bench.corpora import docstring_corpus
    docs_path, qa_path = os.path.join(work, "doc_kb.jsonl"), os.path.join(work, "doc_qa.jsonl")
    kept, seen = 0, set()
    with open(docs_path, "w") as fd, open(qa_path, "w") as fq:
        for d in docstring_corpus(args.docstrings * 2):
            parts = re.split(r"(?<=[.!?])\s+", " ".join(d.text.split()), maxsplit=1)
            if len(parts) < 2 or len(parts[0].split()) < 4 or len(parts[1].split()) < 8 or parts[1] in seen:
                continue   # (build_kb drops a repeated text: its question would name a missing document)
            seen.add(parts[1])
            fd.write(json.dumps({"id": d.id, "title": "", "text": parts[1]}) + "\n")
            fq.write(json.dumps({"question": parts[0], "answers": [d.title], "supporting_ids": [d.id]}) + "\n")
            kept += 1
            if kept == args.docstrings:
                break
    t0 = time.time()
    build(docs_path, os.path.join(work, "doc_kb"))
    row("docstring KB build", f"{time.time() - t0:.0f} s", f"({args.docstrings} documents, bm25 + dense)")
    heldout = os.path.join(work, "doc_heldout.jsonl")
    seconds, last = train("--kb", os.path.join(work, "doc_kb"), "--qa", qa_path, "--steps", str(args.steps),
                          "--heldout-out", heldout)
    row("contrastive run, wall time", f"{seconds / 60:.1f} min")
    for retriever, encoder in (("bm25", "base"), ("dense", "base"), ("dense", "tuned")):
        proc = subprocess.run([sys.executable, "-m", "kb_tools.eval_retrieval", "--kb", os.path.join(work, "doc_kb"),
                               "--queries", heldout, "--retriever", retriever, "--query-encoder", encoder, "--json"],
                              cwd=REPO, capture_output=True, text=True)
        m = json.loads(proc.stdout)
        row(f"held-out nDCG@10, {retriever} ({encoder})" if retriever == "dense" else "held-out nDCG@10, bm25",
            f"{m['ndcg@10']:.3f}", f"(Recall@1 {m['recall@1']:.3f}, {m['queries']} queries)")

print("\n| measure | value | note |\n|---|---|---|")
for measure, value, note in rows:
    print(f"| {measure} | {value} | {note} |")
