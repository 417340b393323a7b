"""
Pretrain a base model.

    python -m scripts.base_train --depth 4 --run dummy                            # one process
    torchrun --standalone --nproc_per_node=2 -m scripts.base_train -- --depth 4   # DDP (gloo on CPU, nccl on CUDA)

--depth is the one dial: width, heads and learning-rate scaling follow from it.

Retrieval-augmented pretraining (In-Context RALM / REALM style), --retrieval-augment K --kb KB_DIR:
each document is cut into sequences, and each sequence is read after the K chunks the KB's
--retriever finds for the text just before it (the document's first line, then the end of the
previous sequence; never a chunk of the document itself, compared by text). The loss covers only
the sequence's own tokens, so the model learns from the start that documents in its context are
worth reading. Validation then also reports bpb on held-out sequences with and without their
neighbours. --kb without --retrieval-augment trains plainly and reports both numbers with 3
neighbours (retrieval at test time only, as In-Context RALM does with an off-the-shelf model).
With --marginalize (REALM's objective; a KB with a dense index), each sequence is instead read K
times, once after each of the K chunks a trainable query encoder ranks highest, and the loss is
-log sum_d p(d|query) p(sequence|d, query): the encoder trains too, toward the chunks that make the
text likely (saved as query_encoder/ beside the checkpoint).
For the knowledge world, `python -m tasks.knowledge_world --out DIR --realm` writes such a corpus:
the KB is the world's articles, the text is questions about them.
"""
import gc
import time
import math
import argparse

import torch
import torch.distributed as dist

from nanochat.common import compute_init, compute_cleanup, print0, init_wandb, autocast_ctx, die
from nanochat.gpt import GPT, config_from_depth
from nanochat.mamba import MAMBA_INITS
from nanochat.nanochat_format import trunk_features
from nanochat.tokenizer import get_tokenizer
from tasks.pretraining import GENERATED
from nanochat.dataset import get_source
from nanochat.dataloader import PretrainLoader, NeighbourLoader
from nanochat.loss_eval import evaluate_bpb
from nanochat.optim import setup_optimizers, step_optimizers, all_reduce_grads
from nanochat.checkpoint_manager import save_checkpoint, load_checkpoint, checkpoint_dir, model_tag_for
from nanochat.engine import Engine
from nanochat.rag import exact_match
from tasks.knowledge_world import reading_probe

parser = argparse.ArgumentParser(description="Pretrain a base model (Transformer, Mamba or hybrid)")
# model
parser.add_argument("--depth", type=int, default=4, help="number of layers; width = depth * --aspect-ratio")
parser.add_argument("--aspect-ratio", type=int, default=64, help="model width per layer")
parser.add_argument("--head-dim", type=int, default=64, help="attention head dimension")
parser.add_argument("--block-pattern", default="", help="one letter per layer, T (attention) or M (Mamba), e.g. TMTM; default all T")
parser.add_argument("--mamba-init", default="default", choices=MAMBA_INITS,
                    help="M blocks: mamba_ssm's init; mimetic (Trockman et al. 2024: almost no decay, C = B, near-identity "
                         "conv on B/C; starts near linear attention, which learns recall more easily); or induction "
                         "(mimetic with B's conv on the previous token: a one-layer key -> value lookup). See docs/mamba.md")
parser.add_argument("--max-seq-len", type=int, default=1024, help="context length in tokens")
parser.add_argument("--tie-embeddings", action="store_true",
                    help="one matrix for token embedding and output head (small models copy names from documents far sooner)")
# data
parser.add_argument("--nanochat-arch", action="store_true",
                    help="karpathy/nanochat master's trunk features: resid/x0 scalars, value embeddings on alternate layers, "
                         "smear + backout, SSSL sliding windows (docs/nanochat-import.md: what they bought here)")
parser.add_argument("--short-conv", type=int, default=0,
                    help="T blocks: taps of a causal depthwise conv over the attention input, so each key also "
                         "sees the tokens just before it (Canon layers); 4 helps a small model learn to look "
                         "values up in documents. 0: plain attention")
parser.add_argument("--retrieval-augment", type=int, default=0, metavar="K",
                    help="read each training sequence after K neighbours retrieved from --kb (see above); 0: plain pretraining")
parser.add_argument("--kb", default=None, help="knowledge base (kb_tools.build_kb) the neighbours come from")
parser.add_argument("--retriever", default="bm25", choices=["simple", "bm25", "dense", "hybrid"],
                    help="how neighbours are found (--marginalize: dense, with the query encoder it trains)")
parser.add_argument("--marginalize", action="store_true", help="REALM: marginal likelihood over the K neighbours, query encoder trained")
parser.add_argument("--retriever-temperature", type=float, default=0.1, help="--marginalize: p(d|query) = softmax(cosine / this)")
parser.add_argument("--encoder-lr", type=float, default=2e-5, help="--marginalize: AdamW learning rate of the query encoder")
parser.add_argument("--data", default="embedded",
                    help="'embedded' (offline generated corpus), 'realtext' (docstrings and docs on this machine), 'fineweb', "
                         "a directory of parquet files, or a mix such as 'embedded:3+realtext:1' (proportions by documents)")
# optimisation
parser.add_argument("--num-iterations", type=int, default=1000, help="optimizer steps")
parser.add_argument("--device-batch-size", type=int, default=8, help="sequences per forward pass per process")
parser.add_argument("--total-batch-size", type=int, default=-1, help="tokens per optimizer step across processes (-1: one forward per process, no accumulation)")
parser.add_argument("--matrix-lr", type=float, default=0.02, help="Muon learning rate (2-D matrices in blocks)")
parser.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW learning rate of the embedding")
parser.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW learning rate of the output head")
parser.add_argument("--other-lr", type=float, default=0.004, help="AdamW learning rate of non-matrix parameters (Mamba conv/dt/A/D/norm)")
parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (embedding and head only)")
parser.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps with linear LR warmup")
parser.add_argument("--warmdown-ratio", type=float, default=0.2, help="fraction of final steps with linear LR decay to --final-lr-frac")
parser.add_argument("--final-lr-frac", type=float, default=0.0, help="LR at the end as a fraction of the initial LR")
# evaluation, output
parser.add_argument("--eval-every", type=int, default=250, help="evaluate validation bits-per-byte every N steps (0: only at the end)")
parser.add_argument("--eval-tokens", type=int, default=64 * 1024, help="validation tokens per evaluation")
parser.add_argument("--sample-every", type=int, default=500, help="print samples every N steps (0: only at the end)")
parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
parser.add_argument("--resume-from-step", type=int, default=-1, help="resume from this checkpoint step of the same --model-tag")
parser.add_argument("--model-tag", default="", help="checkpoint directory name (default d<depth>[_<pattern>])")
parser.add_argument("--seed", type=int, default=0,
                    help="another seed is a replicate: other initial weights and the data stream from another point")
parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="torch.compile the training forward/backward (on by default: CPU ~1.4x faster steps after "
                         "~15 s of compiling, docs/benchmarks.md; --no-compile for short runs and tests)")
parser.add_argument("--device-type", default="", help="cuda | mps | cpu (default: autodetect)")
parser.add_argument("--run", default="dummy", help="wandb run name ('dummy' disables wandb)")
args = parser.parse_args()
user_config = vars(args).copy()

for flag in ("depth", "num_iterations", "device_batch_size", "max_seq_len", "eval_tokens"):
    if getattr(args, flag) <= 0:
        die(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
if not 0 <= args.warmup_ratio + args.warmdown_ratio <= 1:
    die("--warmup-ratio + --warmdown-ratio must be between 0 and 1")
if args.retrieval_augment < 0:
    die(f"--retrieval-augment must be >= 0, got {args.retrieval_augment}")
if args.retrieval_augment and not args.kb:
    die("--retrieval-augment needs --kb KB_DIR (the knowledge base the neighbours come from)")
if args.marginalize and not args.retrieval_augment:
    die("--marginalize needs --retrieval-augment K (the neighbours to marginalise over) and --kb")
if args.marginalize:
    args.retriever = "dense"

SEED_DOCS = 1_000_000
# -----------------------------------------------------------------------------
# Setup: processes, tokenizer, model
ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
master = rank == 0
wandb_run = init_wandb(args.run, "nanochat-rag", user_config, master)
try:
    tokenizer = get_tokenizer()
except (FileNotFoundError, ValueError) as e:
    die(str(e))
token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.long, device=device)
vocab_size = ((tokenizer.get_vocab_size() + 63) // 64) * 64   # padded: faster matmuls, room to spare
try:
    features = trunk_features(args.depth, args.max_seq_len, block_pattern=args.block_pattern.upper()) if args.nanochat_arch else {}
    config = config_from_depth(args.depth, vocab_size, args.max_seq_len, args.aspect_ratio, args.head_dim,
                               args.block_pattern.upper(), tie_embeddings=args.tie_embeddings,
                               short_conv=args.short_conv, mamba_init=args.mamba_init, **features)
except ValueError as e:
    die(str(e))
model_tag = args.model_tag or model_tag_for(args.depth, config.block_pattern)
ckpt_dir = checkpoint_dir("base", model_tag)

with torch.device("meta"):
    model = GPT(config)
model.to_empty(device=device)
torch.manual_seed(42 + args.seed)
model.init_weights()
resuming = args.resume_from_step >= 0
if resuming:
    try:
        model_state, optim_state, meta = load_checkpoint(ckpt_dir, args.resume_from_step, device, load_optimizer=True, rank=rank)
    except (FileNotFoundError, ValueError) as e:
        die(str(e))
    if meta["model_config"] != config.to_dict():
        die(f"--resume-from-step: checkpoint config {meta['model_config']} differs from the flags' {config.to_dict()}")
    model.load_state_dict(model_state)
    del model_state
num_params = model.num_params()
print0(f"model {model_tag}: pattern {config.block_pattern}, width {config.n_embd}, heads {config.n_head}, "
       f"{num_params:,} parameters, vocab {vocab_size}, context {config.sequence_len}")

optimizers = setup_optimizers(model, args.matrix_lr, args.embedding_lr, args.unembedding_lr, args.other_lr, args.weight_decay)
if resuming:
    for opt, state in zip(optimizers, optim_state):
        opt.load_state_dict(state)
    del optim_state

# batch sizes
tokens_per_fwd = args.device_batch_size * args.max_seq_len * world_size
total_batch = tokens_per_fwd if args.total_batch_size == -1 else args.total_batch_size
if total_batch % tokens_per_fwd:
    die(f"--total-batch-size {total_batch} must be a multiple of device-batch-size*max-seq-len*processes = {tokens_per_fwd}")
grad_accum = total_batch // tokens_per_fwd
print0(f"{total_batch:,} tokens per step = {args.device_batch_size} seqs x {args.max_seq_len} tokens x {world_size} procs x {grad_accum} accumulation")

# data
try:
    train_source, val_source = get_source(args.data, "train", generated=GENERATED), get_source(args.data, "val", generated=GENERATED)
except (ValueError, FileNotFoundError) as e:
    die(str(e))
# a replicate (--seed) reads the stream from another point: a million documents further per seed
start_doc = meta["loader_state"][rank]["next_doc"] if resuming else (rank + SEED_DOCS * args.seed if args.seed else None)
if resuming and len(meta["loader_state"]) != world_size:
    die(f"checkpoint was written by {len(meta['loader_state'])} processes; resume with the same number (got {world_size})")
kb = None
if args.kb:
    from nanochat.retrieval import RetrievalManager
    try:
        kb = RetrievalManager(args.kb, retriever=args.retriever, query_encoder="base" if args.marginalize else "tuned")
    except (ValueError, FileNotFoundError) as e:
        die(f"{'--marginalize' if args.marginalize else '--kb'}: {e}")
    parent_text = {d.id: d.text for d in kb.documents}
    eval_k = args.retrieval_augment or 3
if args.marginalize:
    # REALM: a trainable query encoder over the KB's frozen document embeddings; evaluation reads its top chunks too
    from nanochat.retrieval.query_encoder import save_beside_checkpoint
    from nanochat.retriever_training import realm_loss, trainable_query_side
    encoder, doc_emb = trainable_query_side(kb, device)
    kb.retriever.query_model = encoder
    encoder_opt = torch.optim.AdamW(encoder.parameters(), lr=args.encoder_lr, weight_decay=0.01)


def neighbour_loader(source, k, next_doc=None):
    return NeighbourLoader(source, tokenizer, kb, parent_text, k, args.device_batch_size, args.max_seq_len, rank, world_size,
                           device, next_doc)


try:
    # --marginalize: the loader hands out units without neighbours; realm_loss retrieves with the encoder
    train_loader = (neighbour_loader(train_source, 0 if args.marginalize else args.retrieval_augment, start_doc)
                    if args.retrieval_augment else
                    PretrainLoader(train_source, tokenizer, args.device_batch_size, args.max_seq_len, rank, world_size, device, start_doc))
except ValueError as e:
    die(f"--retrieval-augment: {e}")


def val_batches(k=None):
    # the same validation documents every time, so evaluations compare; k: held-out sequences read after k neighbours
    if k is not None:
        return iter(neighbour_loader(val_source, k))
    return iter(PretrainLoader(val_source, tokenizer, args.device_batch_size, args.max_seq_len, rank, world_size, device))


eval_steps = max(1, args.eval_tokens // tokens_per_fwd)


def lr_multiplier(step):
    n = args.num_iterations
    warmup, warmdown = round(args.warmup_ratio * n), round(args.warmdown_ratio * n)
    if step < warmup:
        return (step + 1) / warmup
    if step <= n - warmdown:
        return 1.0
    progress = (n - step) / warmdown
    return progress + (1 - progress) * args.final_lr_frac


def muon_momentum(step):
    frac = min(step / 300, 1)   # ramp 0.85 -> 0.95 early, as nanochat
    return (1 - frac) * 0.85 + frac * 0.95


def sample_from_model(step):
    engine = Engine(model, tokenizer)
    model.eval()
    for prompt in ("The capital of", "Q: Who founded", "Once upon a time"):
        rows = engine.generate_batch(tokenizer.encode(prompt, prepend="<|bos|>"), max_tokens=24, temperature=0.0)
        print0(f"  sample@{step}: {tokenizer.decode(rows[0].tokens[1:])!r}")
    model.train()


READING_PROBES = reading_probe(100)


def reading_em():
    """Greedy answers to held-out reading drills (tasks.knowledge_world.reading_probe): EM over all,
    and over answers that are names or years / common words. A base that guesses common words from
    their small sets instead of copying them is slow to learn its first SFT stage."""
    engine = Engine(model, tokenizer)
    probes = [(tokenizer.encode(text, prepend="<|bos|>"), answers, kind) for text, answers, kind in READING_PROBES]
    probes = [p for p in probes if len(p[0]) + 12 <= config.sequence_len]
    if not probes:
        return None
    rows = engine.generate_batch([p for p, _, _ in probes], max_tokens=12, temperature=0.0)
    hits = {}
    for (prompt, answers, kind), row in zip(probes, rows):
        answer = tokenizer.decode(row.tokens[len(prompt):]).split("\n")[0]
        hits.setdefault(kind, []).append(exact_match(answer, answers))
    every = [h for v in hits.values() for h in v]
    return {"all": sum(every) / len(every), **{kind: sum(v) / len(v) for kind, v in hits.items()}}


def save(step, val_bpb):
    # the loader state from before the batch in hand was read, so a resume reads that batch again
    loader_states = [None] * world_size
    if ddp:
        dist.all_gather_object(loader_states, x_state)
    else:
        loader_states = [x_state]
    meta = {"model_config": config.to_dict(), "user_config": user_config, "step": step, "val_bpb": val_bpb,
            "neighbour_bpb": neighbour_bpb, "reading_em": reading,
            "loader_state": loader_states, "loop_state": {"total_train_time": total_train_time}, "phase": "base"}
    save_checkpoint(ckpt_dir, step, model.state_dict(), [o.state_dict() for o in optimizers], meta, rank)
    print0(f"saved checkpoint step {step} to {ckpt_dir}")
    if args.marginalize and master:
        print0(f"saved the query encoder trained with it in {save_beside_checkpoint(encoder, ckpt_dir)}")


# -----------------------------------------------------------------------------
# Training loop
step = args.resume_from_step if resuming else 0
total_train_time = meta["loop_state"]["total_train_time"] if resuming else 0.0
val_bpb = None
smooth_loss = 0.0
model.train()
# training steps run the compiled module (fixed shapes: every batch is device_batch_size x max_seq_len);
# evaluation, sampling and checkpoints use the plain one, which shares its parameters
train_model = torch.compile(model, dynamic=False) if args.compile and not args.marginalize else model
if train_model is not model:   # compiling happens inside the first step: say why it is slow
    print0("compiling the model (the first step takes ~15-25 s on CPU; --no-compile to skip)")
x_state = train_loader.state_dict()


def next_batch():
    if args.marginalize:
        return train_loader.next_units(args.device_batch_size)
    batch = train_loader.next_batch()
    return batch if len(batch) == 3 else (*batch, None)   # (x, y, seq_idx): neighbour rows pack several units


batch = next_batch()
neighbour_bpb, reading = None, None
while True:
    last = step == args.num_iterations
    if last or (args.eval_every > 0 and step % args.eval_every == 0 and step > 0):
        model.eval()
        with autocast_ctx(device):
            val_bpb = evaluate_bpb(model, val_batches(), eval_steps, token_bytes)
            if kb is not None:
                bpb_alone = evaluate_bpb(model, val_batches(0), eval_steps, token_bytes)
                bpb_read = evaluate_bpb(model, val_batches(eval_k), eval_steps, token_bytes)
        line = f"step {step:5d} | val bpb {val_bpb:.4f}"
        if args.marginalize:
            encoder.train()   # the evaluation's searches put it in eval mode
        reading = reading_em() if master else None
        if reading:
            line += (f" | reading EM {reading['all']:.2f} (names and years {reading.get('name or year', float('nan')):.2f}, "
                     f"common words {reading.get('common word', float('nan')):.2f})")
            wandb_run.log({"step": step, "val/reading_em": reading["all"]})
        if kb is not None:
            line += f" | held-out sequences: {bpb_alone:.4f} alone, {bpb_read:.4f} after {eval_k} neighbours"
            neighbour_bpb = {"alone": bpb_alone, "with_neighbours": bpb_read, "k": eval_k}
            wandb_run.log({"step": step, "val/bpb_alone": bpb_alone, "val/bpb_with_neighbours": bpb_read})
        print0(line)
        wandb_run.log({"step": step, "val/bpb": val_bpb})
        model.train()
    if master and (last or (args.sample_every > 0 and step % args.sample_every == 0 and step > 0)):
        sample_from_model(step)
    if last or (args.save_every > 0 and step % args.save_every == 0 and step > 0 and step != args.resume_from_step):
        save(step, val_bpb)
    if last:
        break

    t0 = time.time()
    for _ in range(grad_accum):
        with autocast_ctx(device):
            if args.marginalize:
                loss, realm_stats = realm_loss(model, encoder, doc_emb, kb.chunks, parent_text, train_loader, batch,
                                               args.retrieval_augment, args.retriever_temperature, device)
            else:
                loss = train_model(batch[0], batch[1], seq_idx=batch[2])
        (loss / grad_accum).backward()
        x_state = train_loader.state_dict()
        batch = next_batch()
    all_reduce_grads(model)
    if args.marginalize:
        all_reduce_grads(encoder)
        for group in encoder_opt.param_groups:
            group["lr"] = args.encoder_lr * lr_multiplier(step)
        encoder_opt.step()
        encoder_opt.zero_grad(set_to_none=True)
    lrm = lr_multiplier(step)
    for group in optimizers[-1].param_groups if len(optimizers) > 1 else []:
        group["momentum"] = muon_momentum(step)
    step_optimizers(optimizers, lrm)
    model.zero_grad(set_to_none=True)
    loss_value = loss.item()
    if not math.isfinite(loss_value):
        die(f"loss became {loss_value} at step {step}: lower the learning rates")
    dt = time.time() - t0
    if step > 0:   # the first step includes warm-up costs
        total_train_time += dt
    step += 1
    smooth_loss = 0.9 * smooth_loss + 0.1 * loss_value
    steps_this_run = step - (args.resume_from_step if resuming else 0)
    debiased = smooth_loss / (1 - 0.9 ** steps_this_run)
    tok_per_sec = total_batch / dt
    print0(f"step {step:5d}/{args.num_iterations} | loss {loss_value:.4f} (smooth {debiased:.4f}) | lrm {lrm:.2f} | "
           f"{dt * 1000:.0f} ms | {tok_per_sec:,.0f} tok/s | total {total_train_time / 60:.2f} min"
           + (f" | retriever entropy {realm_stats['entropy']:.2f}, {len(set(realm_stats['top1']))} distinct top-1"
              if args.marginalize else ""))
    wandb_run.log({"step": step, "train/loss": loss_value, "train/lrm": lrm, "train/tok_per_sec": tok_per_sec})
    # Python's cycle collector rescanned everything setup left behind (data, tokenizer, modules) every few
    # steps: ~90 ms a full pass, 2% of a step at depth 4. After the first step, set it all aside and collect
    # by hand now and then (nanochat does the same)
    if steps_this_run == 1:
        gc.collect()
        gc.freeze()
        gc.disable()
    elif step % 250 == 0:
        gc.collect()

print0(f"done: {step} steps, {total_train_time / 60:.2f} min of training, final val bpb {val_bpb:.4f}")
wandb_run.finish()
compute_cleanup()
