"""
Talk to a trained model in the terminal, optionally reading from a knowledge base.

    python -m scripts.chat_cli --source sft --kb KB_DIR                                  # interactive
    python -m scripts.chat_cli --source sft --kb KB_DIR -p "Where was Kela born?"        # one question
    python -m scripts.chat_cli --source sft --kb KB_DIR --retrieval always --top-k 5     # RAG every turn

After each answer it lists the documents the model was shown (number, title, id, first line),
starred where the answer cites them as [n]. In the conversation: 'quit' leaves, 'clear' starts
over, Ctrl-C stops the answer being written. The prompt is built by nanochat/chat.py, the same
code the web UI (scripts/chat_web.py) uses.
"""
import re
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
parser.add_argument("--query-encoder", default="tuned", choices=["tuned", "base"], help="dense/hybrid: tuned = the KB's trained query encoder when it has one (scripts.retriever_train), base = the embedding model")
parser.add_argument("--top-k", type=int, default=3, help="documents per search")
parser.add_argument("--retrieval", default="auto", choices=RETRIEVAL_MODES,
                    help="auto: the model searches when it wants; always: retrieve for every question; ensemble: the same "
                         "documents, each read on its own and the predictions mixed by retrieval score (REPLUG); off: no KB")
parser.add_argument("-p", "--prompt", default=None, help="ask one question, print the answer and its sources, exit")
parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
parser.add_argument("--top-k-sampling", type=int, default=50, help="sample among the k most likely tokens")
parser.add_argument("--max-tokens", type=int, default=None, help="most tokens per answer (default: 256, or less if the model is short)")
parser.add_argument("--copy-answers", action=argparse.BooleanOptionalAction, default=True,
                    help="copy each answer from the documents shown, when there are any: values come out whole, never "
                         "invented (chat_eval --copy-answers measures it); --no-copy-answers lets the model write freely")
parser.add_argument("--seed", type=int, default=42, help="sampling seed (each turn adds its index)")
parser.add_argument("--device-type", default="", help="cuda | mps | cpu (default: autodetect)")
args = parser.parse_args()
# check the flags before loading anything: a typo should not cost a model load
if args.top_k <= 0:
    die(f"--top-k must be positive, got {args.top_k}")
if args.max_tokens is not None and args.max_tokens <= 0:
    die(f"--max-tokens must be positive, got {args.max_tokens}")
if args.temperature < 0:
    die(f"--temperature must be >= 0, got {args.temperature}")
if args.retrieval in ("always", "ensemble") and args.kb is None:
    die(f"--retrieval {args.retrieval} needs --kb")

# the KB first: it loads faster than a model, so a wrong path fails fast
retriever = None
if args.kb and args.retrieval != "off":
    from nanochat.retrieval import RetrievalManager
    try:
        retriever = RetrievalManager(args.kb, retriever=args.retriever, query_encoder=args.query_encoder)
    except (FileNotFoundError, ValueError) as e:
        die(str(e))
mode = args.retrieval if retriever else "off"

_, _, _, _, device = compute_init(args.device_type)
try:
    model, tokenizer, meta = load_model(args.source, device, model_tag=args.model_tag, step=args.step)
except (FileNotFoundError, ValueError) as e:
    die(str(e))
max_tokens_limit = model.config.sequence_len - 32   # chat.respond gives the prompt sequence_len - max_tokens
if args.max_tokens is None:
    args.max_tokens = max(1, min(256, max_tokens_limit))
if args.max_tokens > max_tokens_limit:
    die(f"--max-tokens {args.max_tokens} leaves no room for the prompt: this model allows at most {max_tokens_limit}")

# Model output and KB text are untrusted: a document holding "\x1b]..." could rewrite the terminal.
# Keep newlines and tabs, drop every other control character (the terminal's version of escaping).
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def show(text, end="\n"):
    print(CONTROL.sub("", text), end=end, flush=True)


def answer(messages, seed):
    """Stream one answer to stdout, then list the documents the model was shown. Returns the
    answer text (what was written so far if Ctrl-C stopped it)."""
    text, documents, cited = "", [], []
    line_open = False   # something is printed on the current line: a search goes on a new one
    try:
        for event in respond(model, tokenizer, messages, mode, retriever, args.top_k, args.temperature,
                             args.top_k_sampling, args.max_tokens, seed, copy_answers=args.copy_answers):
            if event["type"] == "search":
                if line_open:
                    show("")
                show(f"[search: {event['query']}]")
                line_open = False
            elif event["type"] == "documents":
                documents += event["documents"]
            elif event["type"] == "token":
                show(event["text"], end="")
                text += event["text"]
                line_open = not event["text"].endswith("\n")
            elif event["type"] == "done":
                text, cited = event["answer"], event["citations"]
    except KeyboardInterrupt:
        show(" [stopped]", end="")
    show("")
    if documents:
        show("Sources:" + (f" (cited: {' '.join(f'[{n}]' for n in cited)})" if cited else ""))
        for d in documents:
            first_line = (d.get("text") or "").strip().split("\n")[0]
            first_line = first_line if len(first_line) <= 100 else first_line[:99] + "…"
            mark = "*" if d["number"] in cited else " "
            show(f" {mark}[{d['number']}] {d.get('title') or d.get('id')} ({d.get('id')}): {first_line}")
    return text


with torch.no_grad():
    if args.prompt is not None:
        answer([{"role": "user", "content": args.prompt}], args.seed)
        sys.exit(0)
    kb = f" over {args.kb} ({args.retriever}, top-k {args.top_k})" if retriever else ""
    print(f"nanochat-rag | {args.source} model {meta['model_config']['block_pattern']} step {meta.get('step')} | "
          f"retrieval {mode}{kb}")
    print("Type 'quit' to exit, 'clear' for a new conversation, Ctrl-C to stop an answer.")
    messages = []
    turn = 0
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
            print("(new conversation)")
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        print("Assistant: ", end="", flush=True)
        messages.append({"role": "assistant", "content": answer(messages, args.seed + turn)})
        turn += 1
