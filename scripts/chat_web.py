"""
Serve a trained model as a chat web app, optionally reading from a knowledge base.

    python -m scripts.chat_web --source sft --kb KB_DIR          # then open http://127.0.0.1:8000
    python -m scripts.chat_web --kb KB_DIR --num-workers 2       # two model replicas (one per GPU on CUDA)
    python -m scripts.chat_web --kb KB_DIR --max-batch 1         # one request at a time per replica

Endpoints:
    GET  /                  the single-page UI (nanochat/ui.html)
    POST /chat/completions  {"messages": [{"role": "user", "content": "..."}], "retrieval": "auto",
                            "top_k": 3, "temperature": 0.6, "top_k_sampling": 50, "max_tokens": 256, "seed": 1}
                            -> a server-sent-event stream, one `data: {json}` line per event of
                            nanochat.chat.respond (search, documents, token, done), or an error event
    GET  /health            {"status": "ok", "workers": n, "free_workers": k, "waiting": requests queued}
    GET  /stats             model, KB, limits, and per-worker request/token counts

The prompt is built by nanochat/chat.py, the same code the CLI uses. Generation is synchronous
torch code, so it never runs on the event loop: each worker (one model replica per device) is a
thread that takes the requests waiting in a queue, up to --max-batch of them, answers them together
in one Engine run (nanochat.chat.respond_batch: one forward per step for all of them, each with
its own settings and seed) and hands each request's events to its async SSE stream. A burst is
split evenly over the idle workers; requests that arrive while all are busy wait for the next
batch. The server binds 127.0.0.1 unless told otherwise: there is no authentication, so exposing
it is a deliberate choice (--host 0.0.0.0).
"""
import os
import json
import time
import random
import queue
import asyncio
import argparse
import threading
from importlib import resources
from contextlib import asynccontextmanager

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from nanochat.common import compute_init, die
from nanochat.checkpoint_manager import load_model, find_model_tag
from nanochat.chat import respond_batch, RETRIEVAL_MODES

# Request limits: a request over any of them is refused with a 4xx and a one-line reason.
MAX_BODY_BYTES = 1_000_000
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
MAX_TOP_K = 20               # documents per search
MAX_TOP_K_SAMPLING = 200
MAX_MAX_TOKENS = 4096        # also capped by the model's sequence length, see below
MAX_TEMPERATURE = 2.0
BATCH_WAIT_S = 0.02          # a worker that picks up a request waits this long for others sent with it

parser = argparse.ArgumentParser(description="Chat with a trained model in the browser (optionally over a knowledge base)")
parser.add_argument("--source", default="sft", choices=["base", "sft", "rl"], help="which training stage's checkpoint to load")
parser.add_argument("--model-tag", default=None, help="checkpoint directory name (default: the latest written)")
parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
parser.add_argument("--kb", default=None, help="knowledge base directory built by kb_tools.build_kb")
parser.add_argument("--retriever", default="bm25", help="simple | bm25 | dense | hybrid (must be built into the KB)")
parser.add_argument("--query-encoder", default="tuned", choices=["tuned", "base"], help="dense/hybrid: tuned = the KB's trained query encoder when it has one (scripts.retriever_train), base = the embedding model")
parser.add_argument("--top-k", type=int, default=3, help="default documents per search (the UI can change it)")
parser.add_argument("--retrieval", default="auto", choices=RETRIEVAL_MODES, help="default retrieval mode (the UI can change it)")
parser.add_argument("--max-searches", type=int, default=4, help="most searches the model may make per answer (mode auto)")
parser.add_argument("--temperature", type=float, default=0.6, help="default sampling temperature")
parser.add_argument("--top-k-sampling", type=int, default=50, help="default: sample among the k most likely tokens")
parser.add_argument("--max-tokens", type=int, default=None, help="default most tokens per answer (default: 256, or less if the model is short)")
parser.add_argument("--copy-answers", action=argparse.BooleanOptionalAction, default=True,
                    help="copy each answer from the documents shown, when there are any: values come out whole, never "
                         "invented (chat_eval --copy-answers measures it); --no-copy-answers lets the model write freely")
parser.add_argument("--num-workers", type=int, default=1,
                    help="model replicas serving requests in parallel; on CUDA worker i uses GPU i (mod the GPU count)")
parser.add_argument("--max-batch", type=int, default=8,
                    help="most requests one replica answers together (one forward per token for all; 1: one at a time)")
parser.add_argument("--device-type", default="", help="cuda | mps | cpu (default: autodetect)")
parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server to the network)")
parser.add_argument("--port", type=int, default=8000, help="port to listen on")
args = parser.parse_args()
if args.num_workers < 1 or args.max_batch < 1:
    die(f"--num-workers and --max-batch must be at least 1, got {args.num_workers} and {args.max_batch}")
if not 1 <= args.top_k <= MAX_TOP_K:
    die(f"--top-k must be in 1..{MAX_TOP_K}, got {args.top_k}")
if not 0 <= args.temperature <= MAX_TEMPERATURE:
    die(f"--temperature must be in 0..{MAX_TEMPERATURE}, got {args.temperature}")
if args.max_tokens is not None and not 1 <= args.max_tokens <= MAX_MAX_TOKENS:
    die(f"--max-tokens must be in 1..{MAX_MAX_TOKENS}, got {args.max_tokens}")
if args.retrieval in ("always", "ensemble") and args.kb is None:
    die(f"--retrieval {args.retrieval} needs --kb")

# -----------------------------------------------------------------------------
# Models (one replica per worker) and the knowledge base (one, shared: searches only read it)

# the KB first: it loads faster than the models, so a wrong path fails fast
retriever = None
if args.kb:
    from nanochat.retrieval import RetrievalManager
    try:
        retriever = RetrievalManager(args.kb, retriever=args.retriever, query_encoder=args.query_encoder)
    except (FileNotFoundError, ValueError) as e:
        die(str(e))

_, _, _, _, device = compute_init(args.device_type)
if device.type == "cuda":
    devices = [torch.device("cuda", i % torch.cuda.device_count()) for i in range(args.num_workers)]
else:
    devices = [device] * args.num_workers   # CPU/MPS: replicas share the device, each runs its own request


class Worker:
    """One model replica and what it has served."""

    def __init__(self, index, device, model):
        self.index, self.device, self.model = index, device, model
        self.requests, self.tokens, self.busy = 0, 0, False


workers = []
try:
    model_tag = args.model_tag or find_model_tag(args.source)   # resolved once: every replica loads the same model
except FileNotFoundError as e:
    die(str(e))
for i, d in enumerate(devices):
    try:
        model, tokenizer, meta = load_model(args.source, d, model_tag=model_tag, step=args.step)
    except (FileNotFoundError, ValueError) as e:
        die(str(e))
    workers.append(Worker(i, d, model))
model_config = meta["model_config"]
# the prompt gets sequence_len - max_tokens tokens (chat.respond), so leave it at least a little room
max_tokens_limit = min(MAX_MAX_TOKENS, model_config["sequence_len"] - 32)
if max_tokens_limit < 1:
    die(f"the model's sequence length {model_config['sequence_len']} is too short to chat with")
if args.max_tokens is None:
    args.max_tokens = min(256, max_tokens_limit)
if args.max_tokens > max_tokens_limit:
    die(f"--max-tokens {args.max_tokens} leaves no room for the prompt: this model allows at most {max_tokens_limit}")

info = {
    "model": {"source": args.source, "model_tag": model_tag,
              "step": meta.get("step"), "block_pattern": model_config["block_pattern"], "n_layer": model_config["n_layer"],
              "n_embd": model_config["n_embd"], "sequence_len": model_config["sequence_len"],
              "params": sum(p.numel() for p in workers[0].model.parameters()), "devices": [str(w.device) for w in workers],
              "max_batch": args.max_batch},
    "kb": None if retriever is None else {"dir": os.path.abspath(args.kb), "retriever": args.retriever,
                                          "documents": len(retriever.documents), "chunks": len(retriever.chunks)},
    "defaults": {"retrieval": args.retrieval if retriever else "off", "top_k": args.top_k, "temperature": args.temperature,
                 "top_k_sampling": args.top_k_sampling, "max_tokens": args.max_tokens},
    "limits": {"messages": MAX_MESSAGES, "message_chars": MAX_MESSAGE_CHARS, "total_chars": MAX_TOTAL_CHARS,
               "top_k": MAX_TOP_K, "top_k_sampling": MAX_TOP_K_SAMPLING, "max_tokens": max_tokens_limit,
               "temperature": MAX_TEMPERATURE, "body_bytes": MAX_BODY_BYTES},
}
UI_HTML = resources.files("nanochat").joinpath("ui.html").read_text(encoding="utf-8")   # package data, also when installed

# -----------------------------------------------------------------------------
# Request checking: plain code, so every refusal says exactly what was wrong


class BadRequest(Exception):
    def __init__(self, message, status=400):
        super().__init__(message)
        self.message, self.status = message, status


def number(body, key, default, lo, hi, kind):
    value = body.get(key, default)
    if value is None:
        value = default
    # bool is an int in Python; true/false is never a valid number here
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise BadRequest(f"{key} must be {'an integer' if kind is int else 'a number'}, got {json.dumps(value)[:40]}")
    if not lo <= value <= hi:
        raise BadRequest(f"{key} must be between {lo} and {hi}, got {value}")
    return kind(value)


def check_request(body):
    """The validated generation settings of a /chat/completions body, or BadRequest."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content} objects")
    if len(messages) > MAX_MESSAGES:
        raise BadRequest(f"too many messages: {len(messages)} (at most {MAX_MESSAGES})", 413)
    total = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise BadRequest(f"message {i} must be an object with a string content")
        expected = "user" if i % 2 == 0 else "assistant"
        if m.get("role") != expected:
            raise BadRequest(f"message {i} has role {json.dumps(m.get('role'))[:40]}, expected {expected!r} "
                             f"(turns alternate user/assistant, starting and ending with user)")
        if len(m["content"]) > MAX_MESSAGE_CHARS:
            raise BadRequest(f"message {i} is too long: {len(m['content'])} characters (at most {MAX_MESSAGE_CHARS})", 413)
        total += len(m["content"])
    if total > MAX_TOTAL_CHARS:
        raise BadRequest(f"conversation is too long: {total} characters (at most {MAX_TOTAL_CHARS}); start a new one", 413)
    if messages[-1]["role"] != "user":
        raise BadRequest("the last message must be from the user")
    if not messages[-1]["content"].strip():
        raise BadRequest("the last message is empty")
    mode = body.get("retrieval") or info["defaults"]["retrieval"]
    if mode not in RETRIEVAL_MODES:
        raise BadRequest(f"retrieval must be one of {', '.join(RETRIEVAL_MODES)}, got {json.dumps(mode)[:40]}")
    if mode != "off" and retriever is None:
        if "retrieval" in body and mode in ("always", "ensemble"):
            raise BadRequest(f"retrieval '{mode}' needs a knowledge base, and this server has none (start it with --kb)")
        mode = "off"
    d = info["defaults"]
    return {
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
        "mode": mode,
        "top_k": number(body, "top_k", d["top_k"], 1, MAX_TOP_K, int),
        "temperature": number(body, "temperature", d["temperature"], 0.0, MAX_TEMPERATURE, float),
        "top_k_sampling": number(body, "top_k_sampling", d["top_k_sampling"], 1, MAX_TOP_K_SAMPLING, int),
        "max_tokens": number(body, "max_tokens", d["max_tokens"], 1, max_tokens_limit, int),
        "seed": number(body, "seed", random.randrange(2**31), 0, 2**31 - 1, int),
    }

# -----------------------------------------------------------------------------
# Generation off the event loop: worker threads answer the waiting requests in batches


class Job:
    """One request waiting for, or inside, a batch: emit(event) feeds its SSE stream (None ends it);
    stop is set when its client goes away."""

    def __init__(self, req, emit):
        self.req, self.emit, self.stop, self.finished = req, emit, threading.Event(), False

    def end(self, event=None):
        if event is not None:
            self.emit(event)
        self.emit(None)
        self.finished = True


jobs = queue.Queue()   # Jobs waiting for a worker


def next_batch(worker):
    """Block for a request, then take the others waiting (up to --max-batch), giving requests sent
    together a moment to arrive. Requests whose client already left are dropped, and a burst is shared
    with the workers still idle (each one waiting in jobs.get() takes what this one puts back)."""
    batch = [jobs.get()]
    worker.busy = True
    deadline = time.monotonic() + BATCH_WAIT_S
    while len(batch) < args.max_batch:
        try:
            batch.append(jobs.get(timeout=max(0.0, deadline - time.monotonic())))
        except queue.Empty:
            break
    idle = sum(not w.busy for w in workers)
    keep = -(-len(batch) // (1 + idle))
    for job in batch[keep:]:
        jobs.put(job)
    for job in batch[:keep]:
        if job.stop.is_set():
            job.end()
    return [job for job in batch[:keep] if not job.finished]


def serve(worker):
    """A worker's thread: answer batches of requests forever, streaming each request's events."""
    while True:
        batch = next_batch(worker)
        if not batch:
            worker.busy = False
            continue
        worker.requests += len(batch)
        stats["batches"] += 1
        try:
            with torch.no_grad():   # grad mode is per thread
                for i, event in respond_batch(worker.model, tokenizer, [job.req for job in batch], retriever,
                                              args.max_searches, stopped=lambda i: batch[i].stop.is_set(),
                                              copy_answers=args.copy_answers):
                    if event["type"] == "token":
                        worker.tokens += 1
                    elif event["type"] == "done":
                        event = {k: v for k, v in event.items() if k != "parts"}   # documents were already streamed
                        event["worker"] = worker.index
                        batch[i].end(event)
                        continue
                    batch[i].emit(event)
        except Exception as e:   # report it in the streams (the 200 header is already sent) and in the log
            stats["errors"] += 1
            print(f"worker {worker.index}: generation failed: {type(e).__name__}: {e}", flush=True)
            for job in batch:
                if not job.finished:
                    job.end({"type": "error", "message": f"generation failed: {type(e).__name__}: {e}"})
        finally:
            for job in batch:   # a stopped request ends here
                if not job.finished:
                    job.end()
            worker.busy = False


stats = {"started": time.time(), "requests": 0, "completed": 0, "rejected": 0, "errors": 0, "batches": 0}


@asynccontextmanager
async def lifespan(app):
    for w in workers:
        threading.Thread(target=serve, args=(w,), daemon=True).start()
    print(f"serving {len(workers)} worker(s) on {', '.join(info['model']['devices'])}, batches of up to "
          f"{args.max_batch} requests, at http://{args.host}:{args.port}", flush=True)
    yield


app = FastAPI(title="nanochat-rag", lifespan=lifespan)


@app.get("/")
async def index():
    return HTMLResponse(UI_HTML)


@app.get("/health")
async def health():
    return {"status": "ok", "workers": len(workers), "free_workers": sum(not w.busy for w in workers),
            "waiting": jobs.qsize()}


@app.get("/stats")
async def get_stats():
    return dict(info, uptime_s=round(time.time() - stats["started"], 1),
                requests=dict({k: v for k, v in stats.items() if k != "started"}, waiting=jobs.qsize()),
                workers=[{"index": w.index, "device": str(w.device), "busy": w.busy, "requests": w.requests,
                          "tokens": w.tokens} for w in workers])


def not_json(name):
    raise ValueError(f"{name} is not JSON")   # Python's json would otherwise accept NaN and Infinity


def refuse(message, status=400):
    stats["rejected"] += 1
    return JSONResponse({"error": message}, status_code=status)


@app.post("/chat/completions")
async def chat_completions(request: Request):
    if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
        return refuse(f"request body is too large (at most {MAX_BODY_BYTES} bytes)", 413)
    raw = b""
    async for chunk in request.stream():   # a chunked body has no content-length: stop reading at the cap
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            return refuse(f"request body is too large (at most {MAX_BODY_BYTES} bytes)", 413)
    try:
        body = json.loads(raw, parse_constant=not_json)
    except (ValueError, UnicodeDecodeError):
        return refuse("the request body is not valid JSON")
    try:
        req = check_request(body)
    except BadRequest as e:
        return refuse(e.message, e.status)
    stats["requests"] += 1
    loop = asyncio.get_running_loop()

    async def stream():
        events = asyncio.Queue()
        job = Job(req, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        jobs.put(job)
        try:
            held = []   # an event taken off the queue while merging, sent next
            while (event := held.pop() if held else await events.get()) is not None:
                # token events that queued up while the client was being written to go out as one
                while event["type"] == "token" and not events.empty():
                    following = events.get_nowait()
                    if following is None or following["type"] != "token":
                        held.append(following)
                        break
                    event = {"type": "token", "text": event["text"] + following["text"]}
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
            stats["completed"] += 1
        finally:   # also on client disconnect (the generator is cancelled): its row stops at the next step
            job.stop.set()

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


if __name__ == "__main__":
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
