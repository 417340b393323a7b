"""
Train a KB's query encoder: the query side of `dense` (and `hybrid`) learns which documents answer
your questions, while the documents keep their embeddings (the index is never rebuilt).

    python -m scripts.retriever_train --kb KB --qa QA.jsonl                       # contrastive (DPR), needs supporting_ids
    python -m scripts.retriever_train --kb KB --qa QA.jsonl --objective lsr       # REPLUG-LSR: the chat model is the teacher

Objectives:
  contrastive  (DPR) each question against its gold documents (`supporting_ids`), with the batch's
               other gold documents and BM25's best wrong ones as negatives; InfoNCE at --temperature.
               Use it when your QA file names the documents that answer each question.
  lsr          (REPLUG-LSR) no document labels: a frozen chat checkpoint (--source, --model-tag) reads
               each of the current top --candidates documents and scores how likely it makes the gold
               answer (mean log-likelihood of the answer's tokens, rendered as in SFT); the retriever's
               softmax(cosine / --gamma) is pulled toward softmax(score / --beta) by KL. Use it when you
               have answers but no document labels, or want the documents *this model* reads best.

Questions are split by document (--heldout-frac; or give --heldout FILE): held-out questions are about
documents no training question touches. Every --eval-every steps the held-out questions are searched
(Recall@1/5/10, MRR@10, nDCG@10, and a collapse monitor: the entropy of the retriever's distribution
over its top candidates and how many distinct documents come first, beside how many distinct gold ones). The best step by held-out MRR@10
is kept; training stops after --patience evaluations without a better one (a small learning rate
and early stopping: fine-tuning MiniLM naively is known to make it worse). If no step beats the base
model, the KB is left as it is.

The encoder is written into the KB (safetensors + JSON, no pickle; manifest.json records the
objective, data, steps and held-out metrics) and from then on serves the queries of `dense` and
`hybrid` everywhere (chat_cli, chat_web, chat_eval, search_kb, eval_retrieval); pass
--query-encoder base there to compare with the base model.
"""
import os
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # see kb_tools/build_kb.py
import json
import time
import random
import hashlib
import argparse

import torch
from tqdm import tqdm

from nanochat.common import compute_init, die, print0
from nanochat.retriever_training import embed, embed_eval, contrastive_loss, lsr_loss, answer_scores, retrieval_metrics, trainable_query_side

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--kb", required=True, metavar="KB_DIR", help="knowledge base with a dense index (kb_tools.build_kb)")
parser.add_argument("--qa", required=True, metavar="QA.jsonl", help='{"question", "answers", "supporting_ids"} per line')
parser.add_argument("--objective", default="contrastive", choices=["contrastive", "lsr"], help="see above (default contrastive)")
parser.add_argument("--heldout", default=None, metavar="FILE.jsonl", help="held-out questions (default: split --qa by document)")
parser.add_argument("--heldout-frac", type=float, default=0.2, help="share of documents whose questions are held out")
# optimisation
parser.add_argument("--steps", type=int, default=300, help="most optimizer steps")
parser.add_argument("--batch-size", type=int, default=32, help="questions per step")
parser.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate (warm-up over the first 10%% of steps)")
parser.add_argument("--eval-every", type=int, default=25, help="held-out evaluation every N steps")
parser.add_argument("--patience", type=int, default=4, help="stop after this many evaluations without a better MRR@10")
parser.add_argument("--seed", type=int, default=0)
# contrastive
parser.add_argument("--temperature", type=float, default=0.05, help="contrastive: InfoNCE temperature")
parser.add_argument("--hard-negatives", type=int, default=4, help="contrastive: BM25's best wrong chunks per question")
# lsr
parser.add_argument("--candidates", type=int, default=8, help="lsr: documents per question the teacher scores (current top-k)")
parser.add_argument("--pool", type=int, default=32, help="candidate pool per question (BM25 + base dense), re-ranked by the encoder each step")
parser.add_argument("--beta", type=float, default=0.1, help="lsr: temperature of the teacher's distribution over candidates")
parser.add_argument("--gamma", type=float, default=0.1, help="temperature of the retriever's distribution (lsr loss, entropy monitor)")
parser.add_argument("--source", default="sft", choices=["base", "sft", "rl"], help="lsr: teacher checkpoint")
parser.add_argument("--model-tag", default=None, help="lsr: teacher model tag (default: the latest)")
parser.add_argument("--step", type=int, default=None, help="lsr: teacher checkpoint step (default: the last)")
parser.add_argument("--score-batch-size", type=int, default=32, help="lsr: (document, question) rows per teacher forward")
# output
parser.add_argument("--no-save", action="store_true", help="measure only: leave the KB as it is")
parser.add_argument("--no-progress", action="store_true", help="no progress bar (the evaluation lines still print)")
parser.add_argument("--heldout-out", default=None, metavar="FILE.jsonl",
                    help="also write the held-out questions here (to evaluate a reader on them with chat_eval --qa)")
parser.add_argument("--device-type", default="", help="cuda | mps | cpu (default: autodetect)")
args = parser.parse_args()
for flag in ("steps", "batch_size", "eval_every", "candidates", "pool", "score_batch_size"):
    if getattr(args, flag) <= 0:
        die(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
for flag in ("lr", "temperature", "beta", "gamma"):
    if getattr(args, flag) <= 0:
        die(f"--{flag} must be positive, got {getattr(args, flag)}")
if not 0 < args.heldout_frac < 1 or args.patience < 0 or args.hard_negatives < 0:
    die("--heldout-frac must be in (0, 1), --patience and --hard-negatives >= 0")
if args.candidates > args.pool:
    die(f"--candidates {args.candidates} is more than --pool {args.pool}")
random.seed(args.seed)
torch.manual_seed(args.seed)
t_start = time.time()

# -----------------------------------------------------------------------------
# The KB (documents frozen: embeddings.npy is read, never written) and the questions

from nanochat.retrieval import RetrievalManager  # noqa: E402
from nanochat.retrieval.query_encoder import save_encoder  # noqa: E402
from tasks.jsonl_qa import read_qa_jsonl, split_by_document  # noqa: E402

try:
    kb = RetrievalManager(args.kb, retriever="dense", query_encoder="base")
    rows = read_qa_jsonl(args.qa)
    heldout_rows = read_qa_jsonl(args.heldout) if args.heldout else None
except (FileNotFoundError, ValueError) as e:
    die(str(e))
chunks = kb.chunks
chunk_doc = [c.doc_id for c in chunks]
chunks_of = {}
for i, d in enumerate(chunk_doc):
    chunks_of.setdefault(d, []).append(i)
for path, group in ((args.qa, rows), (args.heldout, heldout_rows or [])):
    for row in group:
        missing = [d for d in row["supporting_ids"] if d not in chunks_of]
        if missing:
            die(f"{path}:{row['line']}: supporting id {missing[0]!r} is not a document of {args.kb}")
if heldout_rows is None:
    rows, heldout_rows = split_by_document(rows, args.heldout_frac, args.seed)
if args.objective == "contrastive":
    unlabeled = next((r for r in rows if not r["supporting_ids"]), None)
    if unlabeled:
        die(f"{args.qa}:{unlabeled['line']}: no supporting_ids; --objective contrastive needs the gold documents "
            f"of every training question (--objective lsr does not)")
heldout_rows = [r for r in heldout_rows if r["supporting_ids"]]
if not rows or not heldout_rows:
    die(f"{args.qa}: {len(rows)} training and {len(heldout_rows)} labelled held-out questions; both must be non-empty "
        f"(held-out questions need supporting_ids to be scored)")
print0(f"{args.objective} on {args.kb}: {len(chunks):,} chunks, {len(rows):,} training / {len(heldout_rows):,} held-out questions")
if args.heldout_out:
    with open(args.heldout_out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({key: v for key, v in r.items() if key != "line"}) + "\n" for r in heldout_rows)

_, _, _, _, device = compute_init(args.device_type)
base_model = kb.kb.manifest["dense"]["model"]
encoder, doc_emb = trainable_query_side(kb, device)   # a private copy: the retrievers' cached model stays base

teacher = None
if args.objective == "lsr":
    from nanochat.checkpoint_manager import load_model, find_model_tag
    try:
        model_tag = args.model_tag or find_model_tag(args.source)
        teacher, tokenizer, _ = load_model(args.source, device, model_tag=model_tag, step=args.step)
    except (FileNotFoundError, ValueError) as e:
        die(str(e))
    teacher.eval()
    print0(f"teacher: {args.source}/{model_tag} ({teacher.config.block_pattern}, {teacher.num_params():,} params)")

# -----------------------------------------------------------------------------
# Candidate pools, taken once with the base encoder and BM25: every step re-ranks its question's
# pool with the current encoder (documents are frozen, so the pool never goes stale)

questions = [r["question"] for r in rows]
base_q = embed_eval(encoder, questions, device)
dense_top = torch.topk(base_q @ doc_emb.T, min(args.pool, len(chunks)), dim=1).indices.tolist()
lexical = None
if "bm25" in kb.kb.manifest["retrievers"]:
    lexical = RetrievalManager(args.kb, retriever="bm25")
    id_to_pos = {c.id: i for i, c in enumerate(chunks)}
    bm25_top = [[id_to_pos[r.document.id] for r in hits] for hits in lexical.search_batch(questions, args.pool)]
else:
    bm25_top = [[] for _ in rows]
pools = []
for d, b in zip(dense_top, bm25_top):
    merged = list(dict.fromkeys(x for pair in zip(b, d) for x in pair))   # alternate BM25 / dense, each once
    merged += [x for x in d + b if x not in merged]
    pools.append(merged[:args.pool])
pool_len = min(len(p) for p in pools)
pools = torch.tensor([p[:pool_len] for p in pools], device=device)
k = min(args.candidates, pool_len)
gold = [set(r["supporting_ids"]) for r in rows]
hard = [[c for c in (b or d) if chunk_doc[c] not in g][:args.hard_negatives] for b, d, g in zip(bm25_top, dense_top, gold)]

# -----------------------------------------------------------------------------
# Held-out evaluation

heldout_q = [r["question"] for r in heldout_rows]
heldout_rel = [r["supporting_ids"] for r in heldout_rows]


def evaluate():
    return retrieval_metrics(embed_eval(encoder, heldout_q, device), doc_emb, chunk_doc, heldout_rel, args.gamma, k)


def show(step, m):
    return (f"step {step:4d} | held-out R@1 {m['recall@1']:.3f} R@5 {m['recall@5']:.3f} MRR@10 {m['mrr@10']:.3f} "
            f"nDCG@10 {m['ndcg@10']:.3f} | entropy {m['entropy']:.2f}, top-1 documents {m['distinct_top1']} (gold {m['distinct_gold']})")


base_metrics = evaluate()
print0(show(0, base_metrics) + "  (base model)")
log = [dict(step=0, **base_metrics)]
best, best_step, best_state, stale = base_metrics["mrr@10"], 0, None, 0

# -----------------------------------------------------------------------------
# Training

lm_cache = {}   # (training row, chunk) -> teacher score


def lsr_batch(batch, q):
    cos_pool = torch.einsum("bd,bpd->bp", q, doc_emb[pools[batch]])
    top = torch.topk(cos_pool.detach(), k, dim=1).indices
    cand = pools[batch].gather(1, top)
    missing = sorted({(i, c) for i, row in zip(batch, cand.tolist()) for c in row} - lm_cache.keys())
    if missing:
        items = [(rows[i]["question"], rows[i]["answers"][0], chunks[c].to_dict()) for i, c in missing]
        lm_cache.update(zip(missing, answer_scores(teacher, tokenizer, items, device, args.score_batch_size)))
    lm = torch.tensor([[lm_cache[(i, c)] for c in row] for i, row in zip(batch, cand.tolist())], device=device)
    return lsr_loss(cos_pool.gather(1, top), lm, args.beta, args.gamma)


def contrastive_batch(batch, q):
    cand = list(dict.fromkeys([c for i in batch for d in rows[i]["supporting_ids"] for c in chunks_of[d]]
                              + [c for i in batch for c in hard[i]]))
    positive = torch.tensor([[chunk_doc[c] in gold[i] for c in cand] for i in batch], device=device)
    return contrastive_loss(q, doc_emb[cand], positive, args.temperature)


encoder.train()
optimizer = torch.optim.AdamW(encoder.parameters(), lr=args.lr, weight_decay=0.01)
warmup = max(1, args.steps // 10)
order, cursor, step = list(range(len(rows))), len(rows), 0
progress = tqdm(total=args.steps, desc=args.objective, unit=" steps", disable=args.no_progress)
for step in range(1, args.steps + 1):
    if cursor + args.batch_size > len(order):   # a pass over the training questions, reshuffled
        random.shuffle(order)
        cursor = 0
    batch = order[cursor:cursor + args.batch_size]
    cursor += args.batch_size
    for group in optimizer.param_groups:
        group["lr"] = args.lr * min(1.0, step / warmup)
    q = embed(encoder, [rows[i]["question"] for i in batch], device)
    loss = lsr_batch(batch, q) if args.objective == "lsr" else contrastive_batch(batch, q)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    progress.update(1)
    progress.set_postfix(loss=f"{loss.item():.4f}")
    if step % args.eval_every == 0 or step == args.steps:
        m = evaluate()
        log.append(dict(step=step, loss=loss.item(), **m))
        tqdm.write(show(step, m))
        if m["mrr@10"] > best:
            best, best_step, stale = m["mrr@10"], step, 0
            best_state = {name: t.detach().to("cpu", copy=True) for name, t in encoder.state_dict().items()}
        else:
            stale += 1
            if args.patience and stale >= args.patience:
                tqdm.write(f"no better held-out MRR@10 in {stale} evaluations: stopping")
                break
progress.close()
seconds = time.time() - t_start
best_metrics = next(m for m in log if m["step"] == best_step)
summary = (f"held-out R@1 {base_metrics['recall@1']:.3f} -> {best_metrics['recall@1']:.3f}, "
           f"MRR@10 {base_metrics['mrr@10']:.3f} -> {best_metrics['mrr@10']:.3f} (best step {best_step} of {step}), "
           f"{seconds / 60:.1f} min")
if args.objective == "lsr":
    summary += f", {len(lm_cache):,} teacher scores"

if best_state is None:
    print0(f"no step beat the base model on held-out MRR@10; {args.kb} is unchanged. {summary}")
elif args.no_save:
    print0(f"--no-save: {args.kb} is unchanged. {summary}")
else:
    encoder.load_state_dict(best_state)
    with open(args.qa, "rb") as f:
        qa_sha = hashlib.sha256(f.read()).hexdigest()
    keep = lambda m: {key: round(v, 4) for key, v in m.items() if key not in ("step", "loss")}
    info = {"objective": args.objective, "base_model": base_model, "steps": step, "best_step": best_step,
            "data": {"qa": os.path.abspath(args.qa), "qa_sha256": qa_sha, "train_questions": len(rows),
                     "heldout_questions": len(heldout_rows),
                     "heldout": os.path.abspath(args.heldout) if args.heldout else f"split by document ({args.heldout_frac})"},
            "heldout_metrics": {"base": keep(base_metrics), "tuned": keep(best_metrics)},
            "hyperparameters": {key: getattr(args, key) for key in ("batch_size", "lr", "seed", "pool", "gamma") +
                                (("candidates", "beta") if args.objective == "lsr" else ("temperature", "hard_negatives"))},
            "seconds": round(seconds, 1)}
    if args.objective == "lsr":
        info["teacher"] = {"source": args.source, "model_tag": model_tag, "step": args.step}
    path = save_encoder(args.kb, encoder, info, log)
    print0(f"saved {path}: {summary}")
