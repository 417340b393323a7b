"""
On-policy RL with search in the loop. For each question the policy samples several answers; in
each one it writes its own search queries, the Engine runs them on the question's knowledge base
and injects the documents, and the final answer is scored against the gold answers (EM + a small
format term, from the task's reward). Advantages are rewards minus the mean of the question's
group (REINFORCE with a per-question baseline; --advantage grpo also divides by the group's std).
Injected documents and the prompt are masked out of the loss.

    python -m scripts.chat_rl                                  # knowledge world, single-hop -> multi-hop
    torchrun --standalone --nproc_per_node=2 -m scripts.chat_rl -- --num-iterations 50
"""
import os
import json
import time
import argparse
from collections import deque

import torch

from nanochat.common import compute_init, compute_cleanup, print0, init_wandb, autocast_ctx, die, sum_over_ranks
from nanochat.checkpoint_manager import load_model, save_checkpoint, checkpoint_dir, find_model_tag
from nanochat.optim import setup_optimizers, step_optimizers, all_reduce_grads
from tasks.sft_data import add_kb_flags, build_mixture, build_task, parse_mixture, parse_curriculum
from nanochat.rollout import rollouts, rl_batch, policy_gradient_loss, evaluate_task, length_buckets, improves_on

parser = argparse.ArgumentParser(description="RL with the model's own searches: rewards from its generated answers")
parser.add_argument("--source", default="sft", choices=["sft", "rl"], help="checkpoint to start from")
parser.add_argument("--model-tag", default=None, help="model tag (default: the latest SFT model)")
parser.add_argument("--block-pattern", default=None, help="refuse a checkpoint whose block pattern differs (safety check)")
# tasks and curriculum
parser.add_argument("--curriculum", default="world2,world3,world4",
                    help="comma list of stages, each a '+'-joined mixture of task[:weight] (as chat_sft's), e.g. 'world2,world3:3+world2'; "
                         "a weight is the task's proportion of the prompts whatever the tasks' sizes (normalised, default 1: "
                         "world3:3+world2 = 75%% world3); training moves to the next stage when rollout EM over the last "
                         "--advance-window steps reaches --advance-em (a single stage = no curriculum)")
parser.add_argument("--advance-em", type=float, default=0.8, help="rollout EM that moves the curriculum on")
parser.add_argument("--advance-window", type=int, default=10, help="steps averaged for --advance-em")
add_kb_flags(parser, heldout_split=True)
parser.add_argument("--max-searches", type=int, default=4, help="searches allowed per answer (hop cap)")
parser.add_argument("--stream-examples", type=int, default=200_000, help="examples per knowledge-world training stream")
parser.add_argument("--seed", type=int, default=1, help="seed of the training streams (differs from SFT's by default)")
# optimisation
parser.add_argument("--num-iterations", type=int, default=100, help="optimizer steps")
parser.add_argument("--prompts-per-step", type=int, default=8, help="questions per step per process")
parser.add_argument("--num-samples", type=int, default=8, help="sampled answers per question (one group)")
parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens the policy may write per answer (documents excluded)")
parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of rollouts")
parser.add_argument("--pg-batch-size", type=int, default=16,
                    help="sequences per forward/backward of the policy-gradient step (sorted by length, gradients accumulated)")
parser.add_argument("--advantage", default="mean", choices=["mean", "grpo"], help="baseline: group mean, or GRPO (mean and std)")
parser.add_argument("--lr-frac", type=float, default=0.1, help="learning rates as a fraction of the base_train defaults")
# evaluation, output
parser.add_argument("--eval-every", type=int, default=25, help="held-out EM every N steps (0: only at the start and the end)")
parser.add_argument("--keep-best", action=argparse.BooleanOptionalAction, default=True,
                    help="save the best of the starting model and every held-out evaluation: a step replaces the kept "
                         "model only if its mean EM over --eval-mixture is higher and its EM on each --hold task no lower, "
                         "so RL never leaves a model worse than it found it; --no-keep-best saves the last step")
parser.add_argument("--eval-examples", type=int, default=60, help="held-out examples per evaluation")
parser.add_argument("--eval-mixture", default="world2,world3,turns3,abstain3",
                    help="comma list of held-out tasks, each evaluated on its own (names as in --curriculum; a :weight is checked, "
                         "not used); the default guards follow-ups and 'not in the documents' too, which reward on "
                         "answering alone can erode")
parser.add_argument("--hold", default="world2,world3",
                    help="comma list of --eval-mixture tasks on which --keep-best never accepts a lower EM (the answers the "
                         "recipe is for); '' to judge by the mean alone")
parser.add_argument("--device-type", default="", help="cuda | mps | cpu (default: autodetect)")
parser.add_argument("--run", default="dummy", help="wandb run name ('dummy' disables wandb)")
args = parser.parse_args()
user_config = vars(args).copy()
for flag in ("num_iterations", "prompts_per_step", "num_samples", "max_new_tokens", "top_k", "max_searches", "pg_batch_size"):
    if getattr(args, flag) <= 0:
        die(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
try:
    stages = parse_curriculum(args.curriculum)
    parse_mixture(args.eval_mixture)
except ValueError as e:
    die(str(e).replace("--mixture", "--curriculum"))

ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
master = rank == 0
wandb_run = init_wandb(args.run, "nanochat-rag-rl", user_config, master)
try:
    model_tag = args.model_tag or find_model_tag(args.source)
    model, tokenizer, meta = load_model(args.source, device, phase="train", model_tag=model_tag,
                                        expect_block_pattern=args.block_pattern)
    # each stage: one weighted mixture; a prompt is scored by the task it came from (TaskMixture.task_at)
    context_len = model.config.sequence_len
    stage_tasks = [build_mixture(stage, args, "train", context_len=context_len) for stage in stages]
    eval_tasks = {name: build_task(name, args, "heldout", context_len=context_len) for name, _ in parse_mixture(args.eval_mixture)}
except (FileNotFoundError, ValueError, RuntimeError) as e:
    die(str(e))
hold = [t for t in args.hold.split(",") if t]
if args.keep_best and not set(hold) <= set(eval_tasks):
    die(f"--hold {args.hold}: every task must be in --eval-mixture ({','.join(eval_tasks)})")
print0(f"RL of {args.source}/{model_tag} ({model.config.block_pattern}); curriculum: {args.curriculum.replace(',', ' -> ')}")
# fine-tuning uses base_train's default learning rates scaled by --lr-frac
optimizers = setup_optimizers(model, 0.02 * args.lr_frac, 0.2 * args.lr_frac, 0.004 * args.lr_frac, 0.004 * args.lr_frac)
pad_id = tokenizer.encode_special("<|assistant_end|>")


def evaluate(step):
    record = {"step": step, "time_min": train_time / 60, "stage": stage}
    for name, task in eval_tasks.items():
        metrics, _ = evaluate_task(model, tokenizer, task, args.eval_examples, max_searches=args.max_searches)
        for k in ("em", "f1", "searches", "gold_recall"):
            record[f"{name}/{k}"] = metrics[k]
    print0(f"step {step:5d} | held-out " + " | ".join(f"{n}: EM {record[n + '/em']:.3f}" for n in eval_tasks))
    return record


ckpt_dir = checkpoint_dir("rl", model_tag)
metrics_path = os.path.join(ckpt_dir, "metrics.jsonl")
if master:
    os.makedirs(ckpt_dir, exist_ok=True)
    open(metrics_path, "w").close()
stage, stage_start, recent_em = 0, 0, deque(maxlen=args.advance_window)
train_time, step = 0.0, 0
start_record, best = None, None   # best: (step, held-out record, weights on the CPU)
while True:
    last = step == args.num_iterations
    if last or (args.eval_every > 0 and step % args.eval_every == 0) or (step == 0 and args.keep_best):
        record = evaluate(step)
        start_record = start_record or record
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        wandb_run.log(record)
        if args.keep_best and improves_on(record, best and best[1], eval_tasks, hold):   # ties keep the earlier model
            best = (step, record, {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
    if last:
        break
    t0 = time.time()
    # --- rollouts: the policy answers each question num_samples times, searching as it likes
    model.eval()
    # prompts of all ranks take the stage's draws in turn: a function of (step, k, rank), no cursor
    mixture = stage_tasks[stage]
    picks = [(((step - stage_start) * args.prompts_per_step + k) * world_size + rank) % len(mixture)
             for k in range(args.prompts_per_step)]
    # every sample of every question of the step in one Engine run
    groups = rollouts(model, tokenizer, [mixture.task_at(i) for i in picks], [mixture[i] for i in picks],
                      args.num_samples, args.temperature, None, args.max_new_tokens,
                      seed=hash((args.seed, step, rank)) & 0x7FFFFFFF, max_searches=args.max_searches, keep_stop=True)
    samples, advantages = [], []
    for _, group in groups:
        rewards = torch.tensor([s["reward"] for s in group])
        adv = rewards - rewards.mean()
        if args.advantage == "grpo":
            adv = adv / (rewards.std() + 1e-4)
        samples += group
        advantages += adv.tolist()
    rollout_time = time.time() - t0
    # --- policy gradient on the sampled tokens only
    model.train()
    num_tokens = sum(sum(s["row"].mask[1:]) for s in samples)   # the policy's tokens in the whole step
    for bucket in length_buckets(samples, args.pg_batch_size):   # similar lengths: little padding
        x, y = rl_batch([samples[i] for i in bucket], pad_id, device)
        adv = torch.tensor([advantages[i] for i in bucket], dtype=torch.float32, device=device)
        with autocast_ctx(device):
            nll = model(x, y, loss_reduction="none").view(y.shape)   # the head runs only on sampled tokens
        loss = policy_gradient_loss(nll, y, adv, num_tokens)
        loss.backward()
    all_reduce_grads(model)
    lrm = 1.0 - step / args.num_iterations   # linear decay to 0, as nanochat's RL
    step_optimizers(optimizers, lrm)
    model.zero_grad(set_to_none=True)
    dt = time.time() - t0
    train_time += dt
    step += 1
    n = len(samples)
    searches = sum(s["searches"] for s in samples)
    recall = [s["gold_recall"] for s in samples if s["gold_recall"] == s["gold_recall"]]
    per_rank = [sum(s["reward"] for s in samples) / n, sum(s["em"] for s in samples) / n, searches / n,
                sum(s["valid_searches"] for s in samples) / max(searches, 1),
                sum(recall) / max(len(recall), 1), sum(s["length"] for s in samples) / n]
    stats = [v / world_size for v in sum_over_ranks(per_rank, device)]   # means over ranks
    reward, em, per_q, valid_rate, gold_recall, length = stats
    recent_em.append(em)
    print0(f"step {step:4d}/{args.num_iterations} | stage {stage} | reward {reward:.3f} | EM {em:.3f} | "
           f"searches/q {per_q:.2f} | valid searches {valid_rate:.2f} | gold recall {gold_recall:.2f} | "
           f"len {length:.1f} | {dt:.1f}s ({rollout_time:.1f}s rollouts)")
    wandb_run.log({"step": step, "reward": reward, "em": em, "searches_per_question": per_q,
                   "valid_search_rate": valid_rate, "gold_recall": gold_recall, "response_length": length})
    if master:
        with open(metrics_path, "a") as f:
            f.write(json.dumps({"step": step, "train/reward": reward, "train/em": em, "train/searches": per_q,
                                "train/valid_searches": valid_rate, "train/gold_recall": gold_recall,
                                "train/length": length, "stage": stage}) + "\n")
    if (stage + 1 < len(stages) and len(recent_em) == args.advance_window
            and sum(recent_em) / len(recent_em) >= args.advance_em):
        stage, stage_start = stage + 1, step
        recent_em.clear()
        print0(f"curriculum: rollout EM reached {args.advance_em:.2f}, moving to stage {stage} ({'+'.join(n for n, _ in stages[stage])})")

kept_step, state, kept_record = step, model.state_dict(), record
if args.keep_best:
    kept_step, kept_record, state = best
meta_out = {"model_config": model.config.to_dict(), "user_config": user_config, "step": kept_step, "phase": "rl",
            "base": {"source": args.source, "model_tag": model_tag}, "heldout": kept_record, "heldout_start": start_record,
            "steps_trained": step, "kept": "start" if kept_step == 0 else ("last" if kept_step == step else "best"),
            "train_time_min": train_time / 60, "query_position": tokenizer.query_position, "text_prefix": tokenizer.text_prefix}
save_checkpoint(ckpt_dir, kept_step, state, None, meta_out, rank)
if master:   # the directory holds this run's final model only: an older run's later step would be loaded instead
    for name in os.listdir(ckpt_dir):
        if name.startswith(("model_", "meta_")) and not name.endswith((f"_{kept_step:06d}.pt", f"_{kept_step:06d}.json")):
            os.remove(os.path.join(ckpt_dir, name))
held = lambda r: ", ".join(f"{n} {r[n + '/em']:.3f}" for n in eval_tasks)
if kept_step == 0:
    print0(f"RL did not beat the {args.source} model on held-out EM (no step better on the mean and as good on {args.hold or 'no task'}; "
           f"{held(start_record)} at the start; last step: {held(record)}): "
           f"saved {ckpt_dir} step 0, the {args.source} model unchanged")
else:
    print0(f"saved {ckpt_dir} step {kept_step} of {step} (held-out EM {held(kept_record)}; at the start: {held(start_record)})")
wandb_run.finish()
compute_cleanup()
