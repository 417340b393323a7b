"""
Does the model look at the document when it answers? For held-out one-document questions of the
knowledge world, the gradient of the answer's first-token logit with respect to the input
embeddings, read at the document's copy of that token, next to the same gradient at the other
document tokens. A model that copies the answer out of the document has a large gradient at the
copy (attention: one step); a model that ignores the document has ~0 there (the pure Mamba-2
stack of the earlier CPU recipe: 0.00-0.08, docs/cpu-recipe-history.md).

    NANOCHAT_BASE_DIR=runs/cpu_d4 python -m bench.bench_reading_gradient --model-tag d4
    NANOCHAT_BASE_DIR=runs/mmmm python -m bench.bench_reading_gradient --model-tag d4_MMMM --source rl

Questions whose answer token has no copy in the document (the answer starts a turn, the document
may spell it with a leading space: copies are matched on the stripped text) are skipped and
counted. The checkpoint's reading order (query_position) is used, as everywhere else.
"""
import argparse

import torch

from nanochat.checkpoint_manager import load_model
from tasks.rag import world_task

parser = argparse.ArgumentParser(description="gradient of the answer's logit at the document's copy of the answer")
parser.add_argument("--source", default="sft", choices=["base", "sft", "rl"], help="which checkpoint")
parser.add_argument("--model-tag", default=None, help="checkpoint directory name (default: the only/latest one)")
parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
parser.add_argument("--num-questions", type=int, default=20, help="held-out one-document questions to read")
args = parser.parse_args()

model, tokenizer, meta = load_model(args.source, "cpu", phase="eval", model_tag=args.model_tag, step=args.step)
pattern = meta["model_config"].get("block_pattern")
captured = {}


def keep_embeddings(module, inputs, output):
    output.retain_grad()
    captured["emb"] = output


def document_positions(ids):
    """Positions of the tokens inside <|doc_start|> ... <|doc_end|> spans."""
    start, end = tokenizer.special["<|doc_start|>"], tokenizer.special["<|doc_end|>"]
    inside, positions = False, []
    for q, t in enumerate(ids):
        if t == end:
            inside = False
        if inside:
            positions.append(q)
        if t == start:
            inside = True
    return positions


model.transformer.wte.register_forward_hook(keep_embeddings)
task = world_task(1, "heldout", num_examples=args.num_questions)
at_copy, elsewhere, skipped = [], [], 0
for i in range(len(task)):
    ids, mask = tokenizer.render_conversation(task[i])
    p = mask.index(1)   # the answer's first token; the logit that predicts it sits at p - 1
    answer = tokenizer.decode([ids[p]]).strip()
    in_docs = document_positions(ids[:p])
    copies = [q for q in in_docs if answer and tokenizer.decode([ids[q]]).strip() == answer]
    if not copies:
        skipped += 1
        continue
    model.zero_grad(set_to_none=True)
    logits = model(torch.tensor([ids]))
    logits[0, p - 1, ids[p]].backward()
    norms = captured["emb"].grad[0].norm(dim=-1)   # (T,) gradient norm per input position
    others = [q for q in in_docs if q not in copies]
    at_copy.append(max(norms[q].item() for q in copies))
    elsewhere.append(norms[others].median().item())

if not at_copy:
    raise SystemExit("no question had a copy of its answer token in the document; nothing to measure")
at_copy, elsewhere = torch.tensor(at_copy), torch.tensor(elsewhere)
print(f"{pattern} {args.source} (query_position {tokenizer.query_position}), {len(at_copy)} questions "
      f"({skipped} without a copy of the answer token, skipped)")
print(f"  gradient norm at the document's copy of the answer: median {at_copy.median():.3f}, "
      f"range {at_copy.min():.3f}-{at_copy.max():.3f}")
print(f"  at other document tokens (median per question):      median {elsewhere.median():.3f}")
print(f"  copy / elsewhere: {(at_copy / elsewhere.clamp(min=1e-12)).median():.1f}x")
