"""
Evaluate a chat model.

Generative QA with retrieval (EM, F1, gold-document recall, searches per question):
    python -m scripts.chat_eval --qa questions.jsonl --kb KB_DIR                 # documents shown before the question
    python -m scripts.chat_eval --qa questions.jsonl --kb KB_DIR --multihop      # the model searches by itself
    python -m scripts.chat_eval --task world3 --no-retrieval                     # the held-out knowledge world, ablation
Categorical (ChatCORE-style: argmax over the answer letters' logits):
    python -m scripts.chat_eval --task arc
"""
import json
import argparse

import torch

from nanochat.common import compute_init, die, print0, atomic_write_json
from nanochat.checkpoint_manager import load_model, find_model_tag
from nanochat.rollout import evaluate_task
from tasks.sft_data import add_kb_flags, build_task, open_kb

parser = argparse.ArgumentParser(description="Evaluate a chat model on QA with retrieval, or on multiple choice")
parser.add_argument("--source", default="sft", choices=["base", "sft", "rl"], help="which checkpoint to evaluate")
parser.add_argument("--model-tag", default=None, help="model tag (default: the latest of --source)")
parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
parser.add_argument("--block-pattern", default=None, help="refuse a checkpoint whose block pattern differs")
parser.add_argument("--task", default=None, help="world1..world4 (held-out knowledge world), turns1..turns4 (its questions as the "
                    "2nd/3rd turn of a chat), abstain1..abstain4 (about entities the KB lacks: EM = abstained), compare2/compare3 "
                    "(comparisons only: documents shown / searched), shuffled2 (world2, documents in random order), arc, mmlu, gsm8k, hotpotqa")
add_kb_flags(parser)
parser.add_argument("--no-retrieval", action="store_true", help="ablation: no documents, searches return nothing")
parser.add_argument("--ensemble", action="store_true",
                    help="REPLUG / RAG-Token decoding: read each retrieved document on its own and mix the next-token "
                         "distributions (lambda = softmax(score / --ensemble-temperature)) instead of reading them together")
parser.add_argument("--ensemble-weights", default="score", choices=["score", "uniform"], help="--ensemble: lambda by retrieval score or uniform")
parser.add_argument("--ensemble-temperature", type=float, default=0.1,
                    help="--ensemble: softmax temperature over retrieval scores (0.1 suits dense cosines; BM25 scores need more)")
parser.add_argument("--copy-answers", action="store_true",
                    help="copy each answer from the documents shown: every answer token must keep it a piece of them "
                         "(or of the abstention phrase), so values come out whole instead of garbled (Engine copy_answers)")
parser.add_argument("--random-documents", action="store_true",
                    help="control: replace each question's retrieved documents with as many random documents of the KB")
parser.add_argument("--shuffle-documents", action="store_true",
                    help="control: show each question's retrieved documents in random order (a model that reads which "
                         "document is about what keeps its EM; one that copies from the first loses it)")
parser.add_argument("--max-searches", type=int, default=4, help="searches allowed per answer")
parser.add_argument("--num-examples", type=int, default=200, help="examples to evaluate (from the start)")
parser.add_argument("--eval-examples", type=int, default=None, help=argparse.SUPPRESS)
parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens the model may write per answer")
parser.add_argument("--json-out", default=None, help="write the metrics (and per-question records) to this JSON file")
parser.add_argument("--show", type=int, default=3, help="print this many example answers")
parser.add_argument("--device-type", default="", help="cuda | mps | cpu (default: autodetect)")
args = parser.parse_args()
if (args.task is None) == (args.qa is None):
    die("give exactly one of --task or --qa")
if args.qa and not args.kb and not args.no_retrieval:
    die("--qa needs --kb (or --no-retrieval)")
if args.top_k <= 0 or args.num_examples <= 0:
    die("--top-k and --num-examples must be positive")
if args.ensemble_temperature <= 0:
    die(f"--ensemble-temperature must be positive, got {args.ensemble_temperature}")
if args.copy_answers and args.ensemble:
    die("--copy-answers reads the documents together: not with --ensemble")
if (args.ensemble or args.random_documents or args.shuffle_documents) and (args.no_retrieval or args.multihop):
    die("--ensemble, --random-documents and --shuffle-documents work on retrieved documents: not with --no-retrieval or --multihop")
args.eval_examples = args.num_examples
args.stream_examples, args.seed = 1, 0

_, _, _, _, device = compute_init(args.device_type)
try:
    model_tag = args.model_tag or find_model_tag(args.source)
    model, tokenizer, meta = load_model(args.source, device, model_tag=model_tag, step=args.step,
                                        expect_block_pattern=args.block_pattern)
    if args.qa:
        from tasks.jsonl_qa import JsonlQA
        from tasks.rag import RAGTask, MultiHopRAGTask
        base = JsonlQA(args.qa)
        if args.no_retrieval:
            task = base
        else:
            kb = open_kb(args.kb, args.retriever, args.embedding_model, args.query_encoder)
            task = MultiHopRAGTask(base, kb, args.top_k) if args.multihop else RAGTask(base, kb, args.top_k)
    else:
        task = build_task(args.task, args, "heldout", context_len=model.config.sequence_len)
    if args.random_documents:
        from tasks.rag import RandomDocuments
        task = RandomDocuments(task)
except (FileNotFoundError, ValueError, RuntimeError) as e:
    die(str(e))
if len(task) == 0:
    die("the evaluation set is empty")


@torch.no_grad()
def categorical_accuracy(task, n):
    """Argmax over the letters' next-token logits after <|assistant_start|>."""
    correct = 0
    n = min(n, len(task))
    for i in range(n):
        example = task[i]
        prompt = tokenizer.render_for_completion(example, max_tokens=model.config.sequence_len)
        logits = model(torch.tensor([prompt], device=device))[0, -1]
        letter_ids = [tokenizer.encode_text(letter)[0] for letter in example["letters"]]
        choice = example["letters"][int(logits[letter_ids].argmax())]
        correct += task.evaluate(example, choice)
    return {"accuracy": correct / n, "n": n}


name = args.qa or args.task
mode = "no retrieval" if args.no_retrieval else ("multi-hop search" if args.multihop or args.task in ("world3", "world4", "hotpotqa") else "retrieval")
if args.ensemble:
    mode = f"ensemble over documents ({args.ensemble_weights} weights)"
if args.random_documents:
    mode += ", random documents"
if args.shuffle_documents:
    mode += ", documents in random order"
if args.copy_answers:
    mode += ", answers copied from the documents"
ensemble = {"weighting": args.ensemble_weights, "temperature": args.ensemble_temperature} if args.ensemble else None
if task.eval_type == "categorical":
    metrics, records = categorical_accuracy(task, args.num_examples), []
    print0(f"{name}: accuracy {metrics['accuracy']:.3f} over {metrics['n']} questions")
else:
    metrics, records = evaluate_task(model, tokenizer, task, args.num_examples, args.max_new_tokens,
                                     retrieval=not args.no_retrieval, max_searches=args.max_searches, ensemble=ensemble,
                                     copy_answers=args.copy_answers)
    print0(f"{name} ({mode}): EM {metrics['em']:.3f} | F1 {metrics['f1']:.3f} | gold-doc recall {metrics['gold_recall']:.3f} "
           f"| searches/question {metrics['searches']:.2f} | abstained {metrics['abstained']:.3f} | over {metrics['n']} questions")
    types = sorted({r["type"] for r in records if r["type"]})
    if len(types) > 1:   # e.g. the turns of a conversation task, or the fields of a machine set
        metrics["em_by_type"] = {t: sum(r["em"] for r in records if r["type"] == t) / sum(r["type"] == t for r in records) for t in types}
        print0("  EM by type: " + ", ".join(f"{t} {em:.3f} ({sum(r['type'] == t for r in records)})" for t, em in metrics["em_by_type"].items()))
    if records and all(r["answers"] for r in records):
        from nanochat.rag import overlap_metrics, shown_rank_metrics, error_class
        line = []
        # BLEU/ROUGE for --qa's free-text answers only: a task's answers are names or set phrases of a few words,
        # scored by EM/F1 (BLEU-4 is 0 without 4-grams), and rouge-score imports all of NLTK (~1 s, ~100 MiB a run)
        if args.qa:
            metrics.update(overlap_metrics([r["answer"] for r in records], [r["answers"] for r in records]))
            line.append(f"BLEU-4 {metrics['bleu4']:.1f} | ROUGE-L {metrics['rouge_l']:.3f}")
        if any(r["gold"] for r in records) and not args.no_retrieval:
            labelled = [r for r in records if r["gold"]]
            metrics.update(shown_rank_metrics([r["shown"] for r in labelled], [r["gold"] for r in labelled], args.top_k))
            line.append(f"shown documents: Hit@1 {metrics['hit@1']:.3f} Hit@{args.top_k} {metrics[f'hit@{args.top_k}']:.3f} MRR {metrics['mrr']:.3f}")
        if line:
            print0("  " + " | ".join(line))
        # every wrong answer, classed: why did it fail, by question type?
        errors = {}
        for r in records:
            r["error"] = error_class(r["answer"], r["em"] == 1, r["shown"], r["gold"], r["found_in"])
            if r["error"]:
                by_type = errors.setdefault(r["type"] or "all", {})
                by_type[r["error"]] = by_type.get(r["error"], 0) + 1
        metrics["errors"] = errors
        for kind, counts in sorted(errors.items()):
            print0(f"  wrong answers ({kind}): " + ", ".join(f"{c} {name}" for name, c in sorted(counts.items())))
    for r in records[:args.show]:
        searches = [p["text"] for p in r["parts"] if p["type"] == "search"]
        print0(f"  Q: {r['question']}\n     searches: {searches}\n     answer: {r['answer']!r} | gold: {r['answers']} | EM {r['em']:.0f}")
if args.json_out:
    out = {"task": name, "source": args.source, "model_tag": model_tag, "block_pattern": model.config.block_pattern,
           "mode": mode, "metrics": metrics, "records": records}
    atomic_write_json(args.json_out, json.loads(json.dumps(out, default=str)))
    print0(f"wrote {args.json_out}")
