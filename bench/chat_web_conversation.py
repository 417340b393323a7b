"""
A conversation in the web UI, as a user has it: starts chat_web on a checkpoint and KB, asks the
questions one after another in one chat (Chromium, driven by Playwright), prints each turn's
searches and answer, and saves a screenshot. How docs/chat_web_conversation.png was made.

    NANOCHAT_BASE_DIR=runs/cpu_d4 python -m bench.chat_web_conversation --kb runs/cpu_d4/kb/heldout \\
        --out docs/chat_web_conversation.png \\
        "In which country is the home city of Danas?" "What is the capital of France?" "Who founded Danas, and when?"
"""
import os
import sys
import time
import socket
import argparse
import subprocess
import urllib.request

parser = argparse.ArgumentParser(description="ask questions in one chat_web conversation and screenshot it")
parser.add_argument("questions", nargs="+", help="the user's turns, in order")
parser.add_argument("--kb", required=True, help="knowledge base directory")
parser.add_argument("--source", default="rl", help="checkpoint: sft | rl")
parser.add_argument("--model-tag", default=None)
parser.add_argument("--retrieval", default="auto", help="auto | always | ensemble | off")
parser.add_argument("--out", default="chat_web_conversation.png", help="screenshot path")
parser.add_argument("--chromium", default="/usr/bin/chromium")
args = parser.parse_args()

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
cmd = [sys.executable, "-m", "scripts.chat_web", "--source", args.source, "--kb", args.kb, "--port", str(port),
       "--temperature", "0"] + (["--model-tag", args.model_tag] if args.model_tag else [])
server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
url = f"http://127.0.0.1:{port}"
try:
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            break
        except OSError:
            if server.poll() is not None:
                sys.exit(f"chat_web exited: {server.stderr.read()[-2000:]}")
            time.sleep(0.2)
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.wait_for_selector("#send")
        page.select_option("#retrieval", args.retrieval)
        for k, question in enumerate(args.questions):
            page.fill("#input", question)
            page.press("#input", "Enter")
            page.wait_for_selector(f".msg.assistant.finished >> nth={k}", timeout=120_000)
            answer = page.locator(".msg.assistant").nth(k)
            answer.click()   # its documents in the Sources panel
            sources = page.text_content("#sources") or ""
            print(f"turn {k + 1}: {question}\n  answer: {answer.locator('.text').text_content().strip()!r}\n"
                  f"  sources: {' '.join(sources.split())[:300]}")
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        page.screenshot(path=args.out, full_page=True)
        print(f"wrote {args.out}")
        browser.close()
finally:
    server.terminate()
    server.wait()
