"""
Talk to a trained model in the terminal, optionally reading from a knowledge base.

    python -m scripts.chat_cli --source sft --kb KB_DIR                 # interactive
    python -m scripts.chat_cli --source sft --kb KB_DIR -p "Where was Kela born?"
Type 'quit' to leave, 'clear' to start a new conversation.
"""
import sys
import argparse

import torch

from nanochat.common import compute_init, die
from nanochat.checkpoint_manager import load_model
from nanochat.chat import respond, RETRIEVAL_MODES

parser = argparse.ArgumentParser(description="Chat with a trained model (optionally over a knowledge base)")
parser.add_argument("--source", default="sft", choices=["base", "sft", "rl"], help="which training stage's checkpoint to load")
parser.add_argument("--model-tag", default=None, help="checkpoint directory name (default: the latest written)")
parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
parser.add_argument("--kb", default=None, help="knowledge base directory built by kb_tools.build_kb")
parser.add_argument("--retriever", default="bm25", help="simple | bm25 | dense | hybrid (must be built into the KB)")
parser.add_argument("--top-k", type=int, default=3, help="documents per search")
parser.add_argument("--retrieval", default="auto", choices=RETRIEVAL_MODES,
                    help="auto: the model searches when it wants; always: retrieve for every question; off: no KB")
parser.add_argument("-p", "--prompt", default=None, help="ask one question, print the answer and its sources, exit")
parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
parser.add_argument("--top-k-sampling", type=int, default=50, help="sample among the k most likely tokens")
parser.add_argument("--max-tokens", type=int, default=256, help="most tokens per answer")
parser.add_argument("--device-type", default="", help="cuda | mps | cpu (default: autodetect)")
args = parser.parse_args()
if args.top_k <= 0:
    die(f"--top-k must be positive, got {args.top_k}")
if args.max_tokens <= 0:
    die(f"--max-tokens must be positive, got {args.max_tokens}")
if args.temperature < 0:
    die(f"--temperature must be >= 0, got {args.temperature}")

_, _, _, _, device = compute_init(args.device_type)
try:
    model, tokenizer, meta = load_model(args.source, device, model_tag=args.model_tag, step=args.step)
except (FileNotFoundError, ValueError) as e:
    die(str(e))

retriever = None
if args.kb and args.retrieval != "off":
    from nanochat.retrieval import RetrievalManager
    try:
        retriever = RetrievalManager(args.kb, retriever=args.retriever)
    except (FileNotFoundError, ValueError) as e:
        die(str(e))
elif args.retrieval != "off" and args.kb is None and args.retrieval == "always":
    die("--retrieval always needs --kb")


def answer(messages):
    """Stream one answer to stdout, then list the documents the model was shown."""
    documents, cited, text = [], [], ""
    for event in respond(model, tokenizer, messages, args.retrieval if retriever else "off", retriever, args.top_k,
                         args.temperature, args.top_k_sampling, args.max_tokens):
        if event["type"] == "search":
            print(f"  [search] {event['query']}", flush=True)
        elif event["type"] == "token":
            print(event["text"], end="", flush=True)
        elif event["type"] == "done":
            text, documents, cited = event["answer"], event["documents"], event["citations"]
    print()
    if documents:
        print("Sources:")
        for d in documents:
            first_line = (d.get("text") or "").strip().split("\n")[0][:100]
            mark = "*" if d["number"] in cited else " "
            print(f" {mark}[{d['number']}] {d.get('title') or d.get('id')} ({d.get('id')}): {first_line}")
    return text


with torch.no_grad():
    if args.prompt is not None:
        answer([{"role": "user", "content": args.prompt}])
        sys.exit(0)
    print(f"nanochat-rag | {args.source} model {meta['model_config']['block_pattern']} | "
          f"retrieval {args.retrieval if retriever else 'off'}{' over ' + args.kb if retriever else ''}")
    print("Type 'quit' to exit, 'clear' for a new conversation.")
    messages = []
    while True:
        try:
            line = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if line.lower() in ("quit", "exit"):
            break
        if line.lower() == "clear":
            messages = []
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        print("Assistant: ", end="", flush=True)
        messages.append({"role": "assistant", "content": answer(messages)})
