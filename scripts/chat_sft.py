"""
Supervised fine-tuning from a base checkpoint, on a mixture of tasks that can include RAG and
multi-hop REFRAG conversations. Retrieval is data here, not a different trainer.

    python -m scripts.chat_sft                                          # offline default: the knowledge-world curriculum
    python -m scripts.chat_sft --source sft --kb my_kb --qa my_qa.jsonl  # your own documents (see below)
    torchrun --standalone --nproc_per_node=2 -m scripts.chat_sft -- --num-iterations 100

The loss covers only what the assistant writes (answers, search queries); documents, user turns
and tool output are context. Training follows a curriculum of mixtures: it moves to the next
stage when the model already gets --advance-em of the stage's first task's conversations it is
about to train on right (every token argmax-correct, measured on the batch before its update:
fresh examples, so an honest estimate; the other tasks of a stage ride along). A tiny model on a CPU that met several documents before it could copy
from one never learned either. Held-out answer loss and EM are logged to metrics.jsonl next to
the checkpoint, for plots.

Your own documents: with --qa and no --curriculum the run is qa:0.5+read1:0.25+read3:0.25 (your questions and
fresh reading drills in every batch, so the model keeps reading instead of memorising your
answers), a fifth of your documents' questions are held out (split by document: held-out
questions are about documents no training question touches), held-out EM picks the checkpoint
(early stopping), and the last line gives held-out EM with and without retrieval.

RAG (Lewis et al. 2020), --marginalize sequence|token with --qa over a KB with a dense index: the
generator and the KB's query encoder train together, no document labels needed. Each question's
top --marginal-k chunks (exact cosine of the encoder's query vector against the frozen document
embeddings) become K rows, one document each, rendered like any RAG conversation; p(d|x) =
softmax(cosine / --retriever-temperature) over them, and the loss is the answer's likelihood
marginalised over the K documents, per sequence (one document explains the answer) or per token.
Documents that make the answer likely gain probability, so the retriever learns what the reader
can use. Held-out EM reads the encoder's top document; held-out recall@1, the retriever's entropy
and its number of distinct top-1 documents (RAG's known failure is collapse onto a few documents)
are logged. The encoder is saved with the checkpoint (query_encoder/) and, with --encoder-to-kb,
into the KB, where dense/hybrid retrieval serves it everywhere.
"""
import gc
import os
import json
import time
import math
import argparse

from collections import deque

import torch

from nanochat.common import compute_init, compute_cleanup, print0, init_wandb, autocast_ctx, die, sum_over_ranks
from nanochat.checkpoint_manager import load_model, save_checkpoint, checkpoint_dir, find_model_tag
from nanochat.optim import setup_optimizers, step_optimizers, all_reduce_grads
from tasks.sft_data import add_kb_flags, build_mixture, build_task, packed_batches, parse_mixture, \
    parse_curriculum, conversation_exact_match
from nanochat.rollout import evaluate_task

parser = argparse.ArgumentParser(description="Supervised fine-tuning on chat / RAG / multi-hop search conversations")
parser.add_argument("--source", default="base", choices=["base", "sft"], help="checkpoint to start from")
parser.add_argument("--model-tag", default=None, help="model tag to load (default: the latest model of --source)")
parser.add_argument("--out-tag", default=None, help="model tag to save under (default: the loaded tag; with --qa: <tag>_<KB directory name>, "
                                                    "so the model it started from is kept)")
parser.add_argument("--block-pattern", default=None, help="refuse a checkpoint whose block pattern differs (safety check)")
# data
WORLD_CURRICULUM = "world1,world2+world1,world3:2+world2,world3:2+world4+world2"
OWN_DOCS_CURRICULUM = "qa:0.5+read1:0.25+read3:0.25"
parser.add_argument("--curriculum", default=None,
                    help="comma list of stages, each a '+'-joined mixture of task[:weight]: world1..world4 (knowledge-world "
                         "levels: 1 doc, distractors, 2-hop search, 3-hop), read1/read2/read3 (reading drills with "
                         "real-English schemas: one rigid key: value record / one document of any shape / with distractors), qa (your --qa over --kb), smoltalk, "
                         "gsm8k, arc, mmlu, hotpotqa (online). A weight is the task's proportion of the training examples "
                         "whatever the tasks' sizes (normalised; default 1): qa:1+world2:3 = 25%% qa, 75%% world2. "
                         f"One stage = a plain mixture. Default: {OWN_DOCS_CURRICULUM} with --qa, else {WORLD_CURRICULUM}")
parser.add_argument("--advance-em", type=float, default=0.9,
                    help="teacher-forced EM of the stage's first task in the training batches that moves to the next stage "
                         "(the other tasks of a stage ride along: world2+read2 advances on world2)")
parser.add_argument("--advance-window", type=int, default=20, help="steps averaged for --advance-em")
parser.add_argument("--max-stage-steps", type=int, default=0,
                    help="a stage that has not reached --advance-em after this many steps moves on anyway, so a model "
                         "that plateaus below the gate still meets the later stages (0: wait for the gate)")
add_kb_flags(parser, heldout_split=True)
parser.add_argument("--query-position", default=None, choices=["after", "before", "both"],
                    help="where a question goes relative to its retrieved documents, for this model from now on (saved with "
                         "it; eval, RL and the chat UIs follow): after them, before them, or both (JRT). Default: the loaded model's")
parser.add_argument("--marginalize", default=None, choices=["sequence", "token"],
                    help="RAG: train the generator and --kb's query encoder together on the answer's likelihood "
                         "marginalised over the top --marginal-k documents (see above); needs --qa and a dense KB")
parser.add_argument("--marginal-k", type=int, default=4, help="--marginalize: documents per question (rows per question)")
parser.add_argument("--retriever-temperature", type=float, default=0.1, help="--marginalize: p(d|x) = softmax(cosine / this)")
parser.add_argument("--encoder-lr", type=float, default=2e-5,
                    help="--marginalize: AdamW learning rate of the query encoder; 0 keeps it frozen (RAG's fixed-retriever ablation)")
parser.add_argument("--encoder-to-kb", action="store_true",
                    help="--marginalize: also write the trained query encoder into --kb (served by dense/hybrid everywhere)")
parser.add_argument("--stream-examples", type=int, default=200_000, help="examples per knowledge-world training stream")
parser.add_argument("--seed", type=int, default=0, help="seed of the training streams")
# optimisation
parser.add_argument("--num-iterations", type=int, default=500, help="optimizer steps")
parser.add_argument("--device-batch-size", type=int, default=8, help="rows per forward pass per process")
parser.add_argument("--max-seq-len", type=int, default=None, help="row length (default: the base model's context)")
parser.add_argument("--lr-frac", type=float, default=1.0, help="learning rates as a fraction of the base_train defaults")
parser.add_argument("--warmdown-ratio", type=float, default=0.3, help="fraction of final steps with linear LR decay to 0")
# evaluation, output
parser.add_argument("--eval-every", type=int, default=100, help="held-out loss and EM every N steps (0: only at the end)")
parser.add_argument("--eval-examples", type=int, default=60, help="held-out examples per EM evaluation")
parser.add_argument("--eval-mixture", default=None,
                    help="comma list of held-out tasks for loss and EM, each evaluated on its own (names as in --curriculum; "
                         "a :weight is checked, not used). Default: qa (the held-out split of --qa) with --qa, else world2,world3")
parser.add_argument("--patience", type=int, default=None,
                    help="stop after this many evaluations without a better mean held-out EM, and keep the best one "
                         "(default: 3 with --qa, 0 = off otherwise)")
parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="torch.compile the model's trunk for training steps (on by default: CPU ~1.2x faster steps after "
                         "20-80 s of compiling, docs/benchmarks.md; --no-compile for short runs and tests)")
parser.add_argument("--device-type", default="", help="cuda | mps | cpu (default: autodetect)")
parser.add_argument("--run", default="dummy", help="wandb run name ('dummy' disables wandb)")
args = parser.parse_args()
own_docs = args.qa is not None
if args.marginalize and args.curriculum:
    die("--marginalize trains on --qa alone: drop --curriculum")
args.curriculum = args.curriculum or ("qa" if args.marginalize else OWN_DOCS_CURRICULUM if own_docs else WORLD_CURRICULUM)
args.eval_mixture = args.eval_mixture or ("qa" if own_docs else "world2,world3")
args.patience = (3 if own_docs else 0) if args.patience is None else args.patience
user_config = vars(args).copy()
if args.num_iterations <= 0 or args.device_batch_size <= 0:
    die("--num-iterations and --device-batch-size must be positive")
if args.top_k <= 0:
    die(f"--top-k must be positive, got {args.top_k}")
if args.max_stage_steps < 0:
    die(f"--max-stage-steps must be >= 0 (0: wait for the gate), got {args.max_stage_steps}")
if not 0 <= args.qa_heldout_frac < 1 or args.patience < 0:
    die("--qa-heldout-frac must be in [0, 1) and --patience >= 0")
if own_docs and not args.kb:
    die("--qa needs --kb KB_DIR (the knowledge base its questions are about)")
if args.marginalize and not (own_docs and args.kb):
    die("--marginalize needs --qa QA.jsonl and --kb KB_DIR (a KB with a dense index)")
if args.marginalize and (args.multihop or args.marginal_k <= 0 or args.retriever_temperature <= 0 or args.encoder_lr < 0):
    die("--marginalize: --marginal-k and --retriever-temperature must be positive, --encoder-lr >= 0, without --multihop")
if args.marginalize:
    from nanochat.retrieval.kb import read_manifest
    try:
        manifest = read_manifest(args.kb)
    except (FileNotFoundError, ValueError) as e:
        die(f"--marginalize: {e}")
    built = manifest.get("retrievers", [])
    if "dense" not in built:
        die(f"--marginalize needs a KB with a dense index; {args.kb} has {', '.join(built)} "
            f"(rebuild it with python -m kb_tools.build_kb --retrievers {','.join(built + ['dense'])})")
    if args.marginal_k > manifest.get("num_chunks", 0):
        die(f"--marginal-k {args.marginal_k} is more than the {manifest.get('num_chunks', 0)} chunks of {args.kb}")
    args.retriever = "dense"   # RAG retrieves with the query encoder it trains
try:
    stages = parse_curriculum(args.curriculum)
    parse_mixture(args.eval_mixture)
except ValueError as e:
    die(str(e))

ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
master = rank == 0
wandb_run = init_wandb(args.run, "nanochat-rag-sft", user_config, master)

# model
try:
    model_tag = args.model_tag or find_model_tag(args.source)
    model, tokenizer, meta = load_model(args.source, device, phase="train", model_tag=model_tag,
                                        expect_block_pattern=args.block_pattern)
except (FileNotFoundError, ValueError) as e:
    die(str(e))
seq_len = args.max_seq_len or model.config.sequence_len
tokenizer.query_position = args.query_position or tokenizer.query_position   # every rendering below follows it
print0(f"SFT of {args.source}/{model_tag} ({model.config.block_pattern}, {model.num_params():,} params), rows of {seq_len} tokens")

# fine-tuning uses base_train's default learning rates scaled by --lr-frac
optimizers = setup_optimizers(model, 0.02 * args.lr_frac, 0.2 * args.lr_frac, 0.004 * args.lr_frac, 0.004 * args.lr_frac)

# data
def stage_batches(stage):
    task = stage_tasks[stage]
    print0(f"curriculum stage {stage}: {'+'.join(f'{n}:{w:.0%}' for n, w in stages[stage])} ({len(task):,} examples per pass)")
    return packed_batches(task, tokenizer, args.device_batch_size, seq_len, rank, world_size, device)


try:
    # every stage built now, so a bad task name or KB fails before training; each stage streams its
    # own examples (seed per stage): a task kept from the previous stage shows new ones
    stage_tasks = [build_mixture(items, args, "train", args.seed + 1000 * k, seq_len) for k, items in enumerate(stages)]
    batches = stage_batches(0)
    eval_tasks = {name: build_task(name, args, "heldout", context_len=seq_len) for name, _ in parse_mixture(args.eval_mixture)}
except (ValueError, FileNotFoundError, RuntimeError) as e:
    die(str(e))
print0(f"held-out eval: {', '.join(eval_tasks)}")

encoder_opt = None
if args.marginalize:
    # RAG: a trainable copy of the KB's query encoder; the documents keep their frozen embeddings
    from nanochat.retrieval import RetrievalManager
    from nanochat.retrieval.query_encoder import save_encoder, save_beside_checkpoint
    from nanochat.retriever_training import rag_loss, embed_eval, retrieval_metrics, trainable_query_side
    from tasks.rag import RAGTask
    try:
        kb = RetrievalManager(args.kb, retriever="dense", query_encoder="base")
    except (ValueError, FileNotFoundError) as e:
        die(f"--marginalize: {e}")
    chunks = kb.chunks
    encoder, doc_emb = trainable_query_side(kb, device, args.query_encoder)
    kb.retriever.query_model = encoder   # held-out retrieval reads the encoder as it trains
    encoder.requires_grad_(args.encoder_lr > 0)
    encoder_opt = torch.optim.AdamW(encoder.parameters(), lr=args.encoder_lr, weight_decay=0.01) if args.encoder_lr > 0 else None
    heldout_qa = eval_tasks["qa"].base
    train_rows = stage_tasks[0].tasks[0].base.rows
    chunk_doc = [c.doc_id for c in chunks]
    labelled = [r for r in heldout_qa.rows if r["supporting_ids"]]   # recall needs labels; training never does

    def question_batches():
        """device_batch_size (question, answer) pairs per step, a shuffled pass at a time; rank r takes every W-th."""
        import random
        rng = random.Random(args.seed)
        while True:
            order = list(range(rank, len(train_rows), world_size))
            rng.shuffle(order)
            for i in range(0, len(order) - args.device_batch_size + 1, args.device_batch_size):
                rows = [train_rows[j] for j in order[i:i + args.device_batch_size]]
                yield [r["question"] for r in rows], [r["answers"][0] for r in rows]

    if len(train_rows) < args.device_batch_size * world_size:
        die(f"--marginalize: {len(train_rows)} training questions, fewer than --device-batch-size x processes")
    batches = question_batches()
    print0(f"RAG-{args.marginalize.capitalize()}: {len(train_rows):,} training questions x {args.marginal_k} documents, "
           f"query encoder {'tuned' if args.query_encoder == 'tuned' and kb.kb.manifest.get('query_encoder') else 'base'} "
           f"({kb.kb.manifest['dense']['model']}), {len(chunks):,} chunks")


@torch.no_grad()
def heldout_answer_loss(task, n=32):
    """Mean loss on the assistant's tokens of held-out examples (teacher forced): moves earlier than EM."""
    total, count = 0.0, 0
    for i in range(min(n, len(task))):
        ids, mask = tokenizer.render_conversation(task[i], max_tokens=seq_len + 1)
        x = torch.tensor([ids[:-1]], device=device)
        y = torch.tensor([[t if m else -1 for t, m in zip(ids[1:], mask[1:])]], device=device)
        with autocast_ctx(device):
            loss = model(x, y, loss_reduction="none")
        total += loss.sum().item()
        count += int((y >= 0).sum())
    return total / max(count, 1)


def evaluate(step):
    model.eval()
    record = {"step": step, "time_min": train_time / 60}
    if args.marginalize:
        # the reader with the encoder's top document, and the encoder's own held-out ranking (labels only scored here)
        encoder.eval()
        eval_tasks["qa"] = RAGTask(heldout_qa, kb, 1)
        if labelled:
            emb = embed_eval(encoder, [r["question"] for r in labelled], device)
            m = retrieval_metrics(emb, doc_emb, chunk_doc, [r["supporting_ids"] for r in labelled],
                                  args.retriever_temperature, args.marginal_k)
            record.update({f"retriever/{k}": m[k] for k in ("recall@1", "recall@5", "mrr@10", "entropy", "distinct_top1")})
            print0(f"step {step:5d} | held-out retrieval R@1 {m['recall@1']:.3f} R@5 {m['recall@5']:.3f} | entropy "
                   f"{m['entropy']:.2f} | top-1 documents {m['distinct_top1']} (gold {m['distinct_gold']})")
        encoder.train()
    for name, task in eval_tasks.items():
        record[f"{name}/answer_loss"] = heldout_answer_loss(task)
        metrics, _ = evaluate_task(model, tokenizer, task, args.eval_examples)
        for k in ("em", "f1", "searches", "gold_recall"):
            record[f"{name}/{k}"] = metrics[k]
    model.train()
    print0(f"step {step:5d} | held-out " + " | ".join(
        f"{n}: EM {record[n + '/em']:.3f} loss {record[n + '/answer_loss']:.3f}" for n in eval_tasks))
    return record


def lr_multiplier(step):
    warmdown = round(args.warmdown_ratio * args.num_iterations)
    return 1.0 if step < args.num_iterations - warmdown else (args.num_iterations - step) / max(warmdown, 1)


out_tag = args.out_tag or (f"{model_tag}_{os.path.basename(os.path.normpath(args.kb))}" if own_docs else model_tag)
ckpt_dir = checkpoint_dir("sft", out_tag)
metrics_path = os.path.join(ckpt_dir, "metrics.jsonl")
if master:
    os.makedirs(ckpt_dir, exist_ok=True)
    open(metrics_path, "w").close()
train_time, step, stage, stage_start = 0.0, 0, 0, 0
recent_em = deque(maxlen=args.advance_window)
best, evals_since_best = None, 0   # early stopping: (mean held-out EM, step, weights, record, answer loss, encoder weights)
model.train()
# --compile: only the trunk (fixed shapes: every batch is device_batch_size x seq_len). The loss head stays
# eager, scoring only the few positions with a target; a fixed-shape graph would score all of them, which
# made the whole compiled model slower than eager (docs/benchmarks.md). Evaluation uses the plain model.
# (--marginalize steps run rag_loss, not the trunk: nothing to compile)
compiled = args.compile and not args.marginalize
trunk = torch.compile(model.trunk, dynamic=False) if compiled else model.trunk
if compiled:   # compiling happens inside the first step: say why it is slow
    print0("compiling the model's trunk (the first step takes ~20-80 s on CPU; --no-compile to skip)")
while True:
    last = step == args.num_iterations
    if last or (args.eval_every > 0 and step % args.eval_every == 0):
        record = evaluate(step)   # every rank evaluates (cheap), rank 0 writes
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        wandb_run.log(record)
        if args.patience:
            # better = higher mean EM; on a tie (small eval sets tie often), lower held-out answer loss
            em = sum(record[f"{n}/em"] for n in eval_tasks) / len(eval_tasks)
            loss = sum(record[f"{n}/answer_loss"] for n in eval_tasks) / len(eval_tasks)
            if best is None or (em, -loss) > (best[0], -best[4]):
                best = (em, step, {k: v.detach().clone() for k, v in model.state_dict().items()}, record, loss,
                        {k: v.detach().clone() for k, v in encoder.state_dict().items()} if args.marginalize else None)
                evals_since_best = 0
            else:
                evals_since_best += 1
                if evals_since_best >= args.patience and not last:
                    print0(f"early stop at step {step}: held-out EM has not beaten {best[0]:.3f} (step {best[1]}) "
                           f"for {args.patience} evaluations")
                    last = True
    if last:
        break
    t0 = time.time()
    names = [name for name, _ in stages[stage]]
    if args.marginalize:
        questions, answers = next(batches)
        with autocast_ctx(device):
            loss, rag_stats = rag_loss(model, tokenizer, encoder, doc_emb, chunks, questions, answers, args.marginal_k,
                                       args.retriever_temperature, args.marginalize, device, seq_len)
        loss.backward()
        counts = [rag_stats["top1_right"], len(questions)]   # batch EM: the row of the encoder's top document
        supervised = rag_stats["tokens"] * args.marginal_k
        all_reduce_grads(encoder)
    else:
        x, y, seq_idx, source = next(batches)
        with autocast_ctx(device):
            loss, hits = model.supervised_loss(trunk(x, seq_idx=seq_idx), y)
        loss.backward()
        # teacher-forced EM of each task of the stage on this batch (fresh examples: an honest estimate)
        counts = [n for t in range(len(names)) for n in conversation_exact_match(hits, torch.where(source == t, y, -1), seq_idx)]
        supervised = int((y >= 0).sum())
    all_reduce_grads(model)
    lrm = lr_multiplier(step)
    step_optimizers(optimizers, lrm)
    model.zero_grad(set_to_none=True)
    if encoder_opt is not None:   # the encoder: a short warm-up, then the generator's schedule
        for group in encoder_opt.param_groups:
            group["lr"] = args.encoder_lr * lrm * min(1.0, (step + 1) / max(1, args.num_iterations // 10))
        encoder_opt.step()
        encoder_opt.zero_grad(set_to_none=True)
    loss_value = loss.item()
    if not math.isfinite(loss_value):
        die(f"loss became {loss_value} at step {step}: lower --lr-frac")
    dt = time.time() - t0
    train_time += dt
    step += 1
    counts = sum_over_ranks(counts, device)
    rights, totals = counts[0::2], counts[1::2]
    batch_em = sum(rights) / max(sum(totals), 1)
    task_em = {name: r / t for name, r, t in zip(names, rights, totals) if t}
    if totals[0]:
        recent_em.append(rights[0] / totals[0])   # the stage's first task decides when to move on
    per_task = f" ({', '.join(f'{n} {e:.2f}' for n, e in task_em.items())})" if len(names) > 1 else ""
    if args.marginalize:
        per_task = f" | retriever entropy {rag_stats['entropy']:.2f}, {len(set(rag_stats['top1']))} distinct top-1"
    print0(f"step {step:5d}/{args.num_iterations} | stage {stage} | loss {loss_value:.4f} | batch EM {batch_em:.3f}{per_task} | "
           f"lrm {lrm:.2f} | {supervised} supervised tokens | {dt * 1000:.0f} ms | total {train_time / 60:.2f} min")
    train_record = {"step": step, "time_min": train_time / 60, "train/loss": loss_value, "train/batch_em": batch_em,
                    "stage": stage, **{f"train/em/{n}": e for n, e in task_em.items()}}
    wandb_run.log({**train_record, "train/lrm": lrm})
    if master:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(train_record) + "\n")
    gate_passed = len(recent_em) == args.advance_window and sum(recent_em) / len(recent_em) >= args.advance_em
    out_of_steps = args.max_stage_steps > 0 and step - stage_start >= args.max_stage_steps
    if stage + 1 < len(stages) and (gate_passed or out_of_steps):
        if gate_passed:
            print0(f"curriculum: {names[0]} reached batch EM {args.advance_em:.2f} at step {step}")
        else:
            em = sum(recent_em) / max(len(recent_em), 1)
            print0(f"curriculum: {names[0]} at batch EM {em:.2f} (gate {args.advance_em:.2f}) after "
                   f"{args.max_stage_steps} steps: moving on at step {step} (--max-stage-steps)")
        stage, stage_start = stage + 1, step
        recent_em.clear()
        batches = stage_batches(stage)
    # the cycle collector rescanned everything setup left behind every few steps: after the first step set
    # it aside and collect by hand now and then (as base_train and nanochat do)
    if step == 1:
        gc.collect()
        gc.freeze()
        gc.disable()
    elif step % 250 == 0:
        gc.collect()

if best is not None and best[1] != step:
    print0(f"keeping step {best[1]}: best mean held-out EM {best[0]:.3f}")
    model.load_state_dict(best[2])
    if args.marginalize:
        encoder.load_state_dict(best[5])
    step, record = best[1], best[3]
meta_out = {"model_config": model.config.to_dict(), "user_config": user_config, "step": step, "phase": "sft", "stage": stage,
            "query_position": tokenizer.query_position, "text_prefix": tokenizer.text_prefix,
            "base": {"source": args.source, "model_tag": model_tag}, "heldout": record, "train_time_min": train_time / 60}
if args.marginalize:
    meta_out["rag"] = {key: getattr(args, key) for key in ("marginalize", "marginal_k", "retriever_temperature", "encoder_lr")}
save_checkpoint(ckpt_dir, step, model.state_dict(), None, meta_out, rank)
print0(f"saved {ckpt_dir} step {step}")
if args.marginalize and master:
    print0(f"saved the query encoder the generator was trained with in {save_beside_checkpoint(encoder, ckpt_dir)}")
    if args.encoder_to_kb:
        keep = ("recall@1", "recall@5", "mrr@10", "entropy", "distinct_top1")
        info = {"objective": f"rag-{args.marginalize}", "base_model": kb.kb.manifest["dense"]["model"], "steps": step,
                "data": {"qa": os.path.abspath(args.qa), "train_questions": len(train_rows),
                         "heldout_questions": len(heldout_qa.rows)},
                "heldout_metrics": {"tuned": {k: record[f"retriever/{k}"] for k in keep if f"retriever/{k}" in record}},
                "generator": {"source": "sft", "model_tag": out_tag, "step": step},
                "hyperparameters": meta_out["rag"]}
        print0(f"wrote the query encoder into {args.kb}: {save_encoder(args.kb, encoder, info)}")

if own_docs and "qa" in eval_tasks:
    # the whole held-out split, with and without the documents: what the model learned to read
    heldout = RAGTask(heldout_qa, kb, 1) if args.marginalize else eval_tasks["qa"]
    model.eval()
    if args.marginalize:
        encoder.eval()
    n = min(len(heldout), 500)
    with_docs, _ = evaluate_task(model, tokenizer, heldout, n)
    without_docs, _ = evaluate_task(model, tokenizer, heldout, n, retrieval=False)
    if master:
        with open(os.path.join(ckpt_dir, "heldout_qa.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in heldout.base.rows)
    num_docs = len({d for row in heldout.base.rows[:n] for d in row["supporting_ids"]})
    print0(f"held-out questions in {ckpt_dir}/heldout_qa.jsonl; evaluate them again with: python -m scripts.chat_eval "
           f"--source sft --model-tag {out_tag} --kb {args.kb} --qa {ckpt_dir}/heldout_qa.jsonl")
    print0(f"own documents: held-out EM {with_docs['em']:.3f} with retrieval, {without_docs['em']:.3f} without "
           f"({n} questions about {num_docs} documents no training question was about; step {step})")
wandb_run.finish()
compute_cleanup()
