"""
chat_web under concurrent streams: time to first token and tokens/s per stream, with requests
answered one at a time per replica (--max-batch 1, as the server worked before) and batched.

    python -m bench.bench_chat_web --base-dir runs/cpu_d4 --source rl --kb runs/cpu_d4/kb/heldout

For each --max-batch value the server is started in a subprocess, --streams clients send their
questions at the same moment (one per knowledge-base document title, sampled at temperature 0.6
with their own seeds), and each stream's first-token latency and token rate are measured from
its server-sent events (the streamed text re-encoded with the model's tokenizer: the server merges
token events that queue up). Run it on an otherwise idle machine.
"""
import os
import sys
import json
import time
import socket
import argparse
import threading
import subprocess
import statistics

import httpx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

parser = argparse.ArgumentParser(description="chat_web: latency and throughput under concurrent streams")
parser.add_argument("--base-dir", required=True, help="NANOCHAT_BASE_DIR holding the checkpoint (a speedrun run directory)")
parser.add_argument("--source", default="rl", choices=["base", "sft", "rl"], help="which checkpoint to serve")
parser.add_argument("--kb", required=True, help="knowledge base directory (questions are made from its titles)")
parser.add_argument("--streams", type=int, default=8, help="concurrent requests")
parser.add_argument("--max-batch", default="1,8", help="comma-separated --max-batch values to compare")
parser.add_argument("--max-tokens", type=int, default=64, help="tokens per answer")
parser.add_argument("--retrieval", default="always", choices=["always", "auto", "off"], help="retrieval mode of the requests")
parser.add_argument("--repeats", type=int, default=2, help="rounds of --streams requests per setting (the first warms up)")
args = parser.parse_args()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def titles(kb, n):
    with open(os.path.join(kb, "docs.jsonl"), encoding="utf-8") as f:
        docs = [json.loads(line) for line, _ in zip(f, range(n))]
    return [d.get("title") or d["text"][:40] for d in docs]


def start_server(max_batch):
    port = free_port()
    env = dict(os.environ, NANOCHAT_BASE_DIR=args.base_dir, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "scripts.chat_web", "--source", args.source, "--kb", args.kb, "--port", str(port),
           "--max-batch", str(max_batch), "--max-tokens", str(args.max_tokens), "--device-type", "cpu"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        if proc.poll() is not None:
            sys.exit(f"chat_web exited with {proc.returncode}:\n{proc.stdout.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            proc.kill()
            sys.exit("chat_web did not answer /health within 120 s")
        time.sleep(0.2)


def one_stream(url, question, seed, out, i):
    body = {"messages": [{"role": "user", "content": question}], "retrieval": args.retrieval,
            "temperature": 0.6, "max_tokens": args.max_tokens, "seed": seed}
    t0 = time.perf_counter()
    first = last = None
    text = ""
    with httpx.stream("POST", url + "/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event["type"] == "token":
                last = time.perf_counter()
                first = first or last
                text += event["text"]
    tokens = len(tokenizer.encode_text(text)) if text else 0
    out[i] = {"ttft": (first or time.perf_counter()) - t0, "tokens": tokens,
              "rate": (tokens - 1) / (last - first) if tokens > 1 and last > first else float("nan"),
              "total": time.perf_counter() - t0}


def measure(url, questions):
    out = [None] * len(questions)
    threads = [threading.Thread(target=one_stream, args=(url, q, k, out, k)) for k, q in enumerate(questions)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out, time.perf_counter() - t0


os.environ["NANOCHAT_BASE_DIR"] = args.base_dir
sys.path.insert(0, REPO)
from nanochat.tokenizer import get_tokenizer   # noqa: E402  (after the base dir is set)
tokenizer = get_tokenizer()
questions = [f"Tell me about {t}." for t in titles(args.kb, args.streams)]
questions += questions[:args.streams - len(questions)] * args.streams   # a KB smaller than --streams
questions = questions[:args.streams]
print(f"{args.streams} concurrent streams, {args.max_tokens} tokens max, retrieval {args.retrieval}, "
      f"model {args.source} in {args.base_dir}")
print(f"{'max batch':>9} | {'TTFT median':>11} | {'TTFT max':>8} | {'tok/s per stream':>16} | {'tok/s total':>11} | {'wall':>6}")
for max_batch in [int(b) for b in args.max_batch.split(",")]:
    proc, url = start_server(max_batch)
    try:
        for _ in range(args.repeats):
            results, wall = measure(url, questions)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    ttft = [r["ttft"] for r in results]
    rates = [r["rate"] for r in results if r["rate"] == r["rate"]]
    total = sum(r["tokens"] for r in results) / wall
    print(f"{max_batch:>9} | {statistics.median(ttft):>10.2f}s | {max(ttft):>7.2f}s | "
          f"{statistics.median(rates) if rates else float('nan'):>16.1f} | {total:>11.1f} | {wall:>5.1f}s")
