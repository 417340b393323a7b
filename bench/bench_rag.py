"""
What RAG fine-tuning (chat_sft --marginalize) costs: seconds per training step and peak memory
for K = 1, 2, 4, 8 documents per question, RAG-Sequence and RAG-Token, next to a plain SFT step on
the same questions with the encoder's top document and a frozen encoder (the same run, one after
the other, each setting in its own process so peak memory is its own).

    NANOCHAT_BASE_DIR=runs/cpu_final python -m bench.bench_rag --model-tag d4 \\
        --kb runs/cpu_final/retriever/kb --qa runs/cpu_final/kb/world/heldout_qa_descriptive.jsonl

A step: --batch-size questions, each rendered K times (one document per row), one forward and
backward of the generator and of the MiniLM query encoder, both optimizers. Peak memory: the
process's peak resident set on CPU (model, encoder, KB and all), torch's peak allocation on CUDA.
"""
import os
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import sys
import json
import time
import argparse
import resource
import subprocess

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--source", default="sft", choices=["base", "sft", "rl"], help="generator checkpoint")
parser.add_argument("--model-tag", default=None, help="generator model tag (default: the latest)")
parser.add_argument("--kb", required=True, help="KB with a dense index")
parser.add_argument("--qa", required=True, help="QA JSONL (question, answers)")
parser.add_argument("--k-values", default="1,2,4,8", help="documents per question to compare")
parser.add_argument("--batch-size", type=int, default=8, help="questions per step (chat_sft --device-batch-size)")
parser.add_argument("--steps", type=int, default=20, help="timed steps per setting (after 3 warm-up steps)")
parser.add_argument("--single", default=None, help=argparse.SUPPRESS)   # "K:mode": one setting, in a child process
args = parser.parse_args()


def one_setting(k, mode):
    """ms per step and peak memory of one setting; mode 'frozen' = plain SFT on the top document."""
    import torch
    from nanochat.common import compute_init
    from nanochat.checkpoint_manager import load_model, find_model_tag
    from nanochat.optim import setup_optimizers, step_optimizers
    from nanochat.retrieval import RetrievalManager
    from nanochat.retriever_training import rag_loss, trainable_query_side
    from tasks.jsonl_qa import read_qa_jsonl
    _, _, _, _, device = compute_init("")
    model, tokenizer, _ = load_model(args.source, device, phase="train", model_tag=args.model_tag or find_model_tag(args.source))
    kb = RetrievalManager(args.kb, retriever="dense", query_encoder="base")
    encoder, doc_emb = trainable_query_side(kb, device)
    rows = read_qa_jsonl(args.qa)
    optimizers = setup_optimizers(model)
    encoder.requires_grad_(mode != "frozen")
    encoder_opt = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad] or [torch.zeros(1)], lr=2e-5)
    times = []
    for step in range(3 + args.steps):
        batch = [rows[(step * args.batch_size + i) % len(rows)] for i in range(args.batch_size)]
        t0 = time.perf_counter()
        loss, _ = rag_loss(model, tokenizer, encoder, doc_emb, kb.chunks, [r["question"] for r in batch],
                           [r["answers"][0] for r in batch], k, 0.1, "sequence" if mode == "frozen" else mode, device)
        loss.backward()
        step_optimizers(optimizers, 1.0)
        encoder_opt.step()
        model.zero_grad(set_to_none=True)
        encoder_opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 3:
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    times.sort()
    return {"ms": 1000 * times[len(times) // 2], "peak_mb": peak, "device": device.type}


if args.single:
    k, mode = args.single.split(":")
    print(json.dumps(one_setting(int(k), mode)))
    sys.exit(0)

settings = [(1, "frozen")] + [(int(k), mode) for k in args.k_values.split(",") for mode in ("sequence", "token")]
results = []
for k, mode in settings:
    proc = subprocess.run([sys.executable, "-m", "bench.bench_rag", *sys.argv[1:], "--single", f"{k}:{mode}"],
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if proc.returncode != 0:
        sys.exit(f"error: K={k} {mode}: {proc.stderr.strip().splitlines()[-1]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    results.append((k, mode, r))
    print(f"K={k} {mode}: {r['ms']:.0f} ms/step, peak {r['peak_mb']:.0f} MB", flush=True)

base_ms = results[0][2]["ms"]
print(f"\n{args.batch_size} questions per step, median of {args.steps} steps, device {results[0][2]['device']}")
print("| setting | K | ms per step | x plain SFT | peak memory (MB) |")
print("|---|---|---|---|---|")
for k, mode, r in results:
    name = "plain SFT, top document, frozen encoder" if mode == "frozen" else f"RAG-{mode.capitalize()}"
    print(f"| {name} | {k} | {r['ms']:.0f} | {r['ms'] / base_ms:.2f} | {r['peak_mb']:.0f} |")
