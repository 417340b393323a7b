"""chat_web end to end on a tiny model and a tiny KB: the server runs in a subprocess; SSE streams are
read with httpx; limits, 8 concurrent streams, a client that hangs up; and the UI in Debian's
Chromium driven by Playwright (skipped only when /usr/bin/chromium is absent; never downloaded)."""
import os
import sys
import json
import time
import socket
import subprocess
import threading

import pytest
import torch

from tests.conftest import REPO

CHROMIUM = "/usr/bin/chromium"
DOCS = [
    {"id": "kela", "title": "Kela Varo", "text": "Kela Varo was born in Osk, the old river city. She wrote three books about the blue king."},
    {"id": "osk", "title": "Osk", "text": "Osk is an old city on the blue river, founded in 1120 by the red queen."},
    {"id": "script", "title": "Script injection test",
     "text": "This document holds <script>alert(1)</script> and <img src=x onerror=alert(2)> as plain text."},
    {"id": "mat", "title": "The cat on the mat", "text": "The red cat sat on the mat under the green house."},
    {"id": "king", "title": "The blue king", "text": "The blue king lived in a house over the river and built a company."},
    {"id": "ansi", "title": "Terminal escape test", "text": "Red \x1b[31mALERT\x1b[0m text, a bell\x07 and a title \x1b]0;pwned\x07 grab."},
]


def make_tiny_chat(root, tokenizer, sequence_len=256):
    """A NANOCHAT_BASE_DIR with a tokenizer and an untrained 2-layer 'sft' checkpoint, plus a bm25 KB.
    The weights are nudged so the model only ever samples word-like tokens (never a stop or tool
    token): answers are gibberish, but they always stream some text, which is what the tests check."""
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.retrieval.kb import build_kb
    base, kb = os.path.join(root, "base"), os.path.join(root, "kb")
    tokenizer.save(os.path.join(base, "tokenizer"))
    V = tokenizer.get_vocab_size()
    config = GPTConfig(sequence_len=sequence_len, vocab_size=V, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for block in model.transformer.h:   # residual branches nonzero, so the context matters
            torch.nn.init.normal_(block.attn.c_proj.weight, std=0.05)
            torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.05)
        # channel 0 of every embedding is large, and lm_head reads it as +3 for " word" tokens and
        # -3 for everything else: a ~25-logit gap, so stop/tool/byte tokens are never sampled
        model.transformer.wte.weight[:, 0] = 8.0
        torch.nn.init.normal_(model.lm_head.weight, std=0.3)
        specials = set(tokenizer.special.values())
        wordy = [i not in specials and (s := tokenizer.decode([i])).startswith(" ") and s[1:].isalpha() for i in range(V)]
        model.lm_head.weight[:, 0] = torch.tensor([3.0 if w else -3.0 for w in wordy])
    meta = {"model_config": config.to_dict(), "user_config": {}, "step": 0, "phase": "sft"}
    save_checkpoint(os.path.join(base, "chatsft_checkpoints", "tiny"), 0, model.state_dict(), None, meta)
    docs_path = os.path.join(root, "docs.jsonl")
    with open(docs_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(d) + "\n" for d in DOCS)
    build_kb([docs_path], kb, retrievers=["bm25"], show_progress=False, log=lambda *a, **k: None)
    return base, kb


@pytest.fixture(scope="module")
def chat_dirs(tmp_path_factory, tokenizer):
    return make_tiny_chat(str(tmp_path_factory.mktemp("chat")), tokenizer)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(chat_dirs, *flags):
    """Run chat_web with 2 CPU workers; yields its base URL, then stops it."""
    import httpx
    base, kb = chat_dirs
    port = free_port()
    env = dict(os.environ, NANOCHAT_BASE_DIR=base, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "scripts.chat_web", "--source", "sft", "--kb", kb, "--port", str(port),
           "--num-workers", "2", "--temperature", "0", "--max-tokens", "16", "--top-k", "3", "--device-type", "cpu", *flags]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        if proc.poll() is not None:
            pytest.fail(f"chat_web exited with {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            proc.kill()
            pytest.fail("chat_web did not answer /health within 60 s")
        time.sleep(0.2)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server(chat_dirs):
    """The streaming tests: the gibberish model writes freely (copied answers are tested on their own
    below; copying from documents may end its gibberish after one token)."""
    yield from start_server(chat_dirs, "--no-copy-answers")


def stream(url, body, timeout=60):
    """POST a chat request and return its SSE events as dicts (asserting the stream is well formed)."""
    import httpx
    events = []
    with httpx.stream("POST", url + "/chat/completions", json=body, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line:
                assert line.startswith("data: "), line
                events.append(json.loads(line[len("data: "):]))
    return events


def ask(question, **kw):
    return dict({"messages": [{"role": "user", "content": question}]}, **kw)


def test_stream_always_mode(server):
    events = stream(server, ask("Where was Kela Varo born?", retrieval="always", top_k=2, max_tokens=12))
    kinds = [e["type"] for e in events]
    assert kinds[0] == "documents" and kinds[-1] == "done" and kinds.count("token") >= 2, kinds
    docs = events[0]["documents"]
    # bm25 returns only documents sharing a word with the question: here just Kela's
    assert [(d["number"], d["title"]) for d in docs] == [(1, "Kela Varo")]
    streamed = "".join(e["text"] for e in events if e["type"] == "token")
    done = events[-1]
    assert streamed == done["answer"] and done["answer"].strip()
    assert "parts" not in done and done["worker"] in (0, 1)
    # off: no documents; the same seed gives the same answer (greedy anyway)
    off = stream(server, ask("Where was Kela Varo born?", retrieval="off", max_tokens=12))
    assert "documents" not in [e["type"] for e in off] and off[-1]["documents"] == []


def test_stream_ensemble_mode(server):
    """The documents of always mode, each read on its own; tokens stream and add up to the answer."""
    q = "Was the blue king born in Osk?"
    events = stream(server, ask(q, retrieval="ensemble", top_k=2, max_tokens=12))
    always = stream(server, ask(q, retrieval="always", top_k=2, max_tokens=12))
    kinds = [e["type"] for e in events]
    assert kinds[0] == "documents" and kinds[-1] == "done" and "token" in kinds, kinds
    assert events[0]["documents"] == always[0]["documents"] and len(events[0]["documents"]) == 2
    assert "".join(e["text"] for e in events if e["type"] == "token") == events[-1]["answer"] != ""


def test_copied_answers_are_pieces_of_the_documents_shown(chat_dirs, tokenizer):
    """chat_web copies answers by default: whatever the (gibberish) model prefers, each answer it
    streams with documents shown is a piece of one document's text or of the abstain sentence."""
    from nanochat.rag import ABSTAIN
    for url in start_server(chat_dirs):
        for question in ("Where was Kela Varo born?", "Who founded Osk, the old city?", "What did the blue king build?"):
            events = stream(url, ask(question, retrieval="always", top_k=3, max_tokens=12))
            docs = events[0]["documents"]
            assert events[0]["type"] == "documents" and docs and events[-1]["type"] == "done", events
            shown = [tokenizer.decode(tokenizer.encode_document(next(d for d in DOCS if d["title"] == doc["title"]), doc["number"]))
                     for doc in docs]
            answer = events[-1]["answer"]
            piece = answer[len(tokenizer.text_prefix):] if answer.startswith(tokenizer.text_prefix) else answer
            assert piece.strip(), events
            assert any(piece in text for text in shown) or ABSTAIN.startswith(piece), (answer, shown)


def test_info_health_and_page(server):
    import httpx
    stats = httpx.get(server + "/stats").json()
    assert stats["model"]["model_tag"] == "tiny" and stats["model"]["block_pattern"] == "TT"
    assert stats["kb"]["documents"] == len(DOCS) and stats["kb"]["retriever"] == "bm25"
    assert stats["limits"]["max_tokens"] == 256 - 32 and len(stats["workers"]) == 2
    assert httpx.get(server + "/health").json()["status"] == "ok"
    page = httpx.get(server + "/")
    assert page.status_code == 200 and "<title>nanochat-rag</title>" in page.text
    for sink in (".innerHTML", ".outerHTML", "insertAdjacentHTML", "document.write"):
        assert sink not in page.text   # untrusted text only ever goes through textContent


BAD_REQUESTS = [
    ("not json", 400, "not valid JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": Infinity}', 400, "not valid JSON"),
    ({"messages": []}, 400, "non-empty list"),
    (ask("x" * 8001), 413, "message 0 is too long: 8001 characters (at most 8000)"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}] * 250 + [{"role": "user", "content": "q"}]},
     413, "too many messages: 501 (at most 500)"),
    ({"messages": [{"role": "user", "content": "a" * 7000}, {"role": "assistant", "content": "b" * 7000}] * 3
     + [{"role": "user", "content": "c" * 7000}]}, 413, "conversation is too long"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "expected 'user'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, 400, "last message must be from the user"),
    ({"messages": [{"role": "user", "content": 3}]}, 400, "string content"),
    (ask("hi", top_k=21), 400, "top_k must be between 1 and 20, got 21"),
    (ask("hi", top_k=0), 400, "top_k must be between 1 and 20"),
    (ask("hi", max_tokens=100000), 400, "max_tokens must be between 1 and 224"),
    (ask("hi", temperature=3), 400, "temperature must be between 0.0 and 2.0"),
    (ask("hi", temperature="hot"), 400, "temperature must be a number"),
    (ask("hi", top_k_sampling=1.5), 400, "top_k_sampling must be an integer"),
    (ask("hi", retrieval="sometimes"), 400, "retrieval must be one of auto, always, ensemble, off"),
    (ask("   "), 400, "the last message is empty"),
]


def test_limits_give_clear_4xx(server):
    import httpx
    for body, status, message in BAD_REQUESTS:
        if isinstance(body, str):
            r = httpx.post(server + "/chat/completions", content=body, headers={"content-type": "application/json"})
        else:
            r = httpx.post(server + "/chat/completions", json=body)
        assert r.status_code == status, (body if isinstance(body, str) else str(body)[:80], r.status_code, r.text)
        assert message in r.json()["error"], (message, r.json())
    r = httpx.post(server + "/chat/completions", content=b"x" * 1_000_001)
    assert r.status_code == 413 and "too large" in r.json()["error"]
    r = httpx.post(server + "/chat/completions", content=(b"x" * 100_000 for _ in range(11)))   # chunked, no length
    assert r.status_code == 413 and "too large" in r.json()["error"]


def test_concurrent_streams_hangup_and_recovery(server):
    import httpx
    results, errors = [None] * 8, []

    def worker(i):
        try:
            results[i] = stream(server, ask(f"Which company did the blue king build? ({i})", retrieval="always",
                                            max_tokens=16, temperature=1.0, seed=i))
        except Exception as e:   # collected, so one failure does not hide the others
            errors.append(f"{i}: {type(e).__name__}: {e}")

    batches_before = httpx.get(server + "/stats").json()["requests"]["batches"]
    t0 = time.time()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    elapsed = time.time() - t0
    assert not errors, errors
    for events in results:
        assert events[0]["type"] == "documents" and events[0]["documents"][0]["title"] == "The blue king"
        assert events[-1]["type"] == "done" and events[-1]["answer"].strip()
    assert {events[-1]["worker"] for events in results} == {0, 1}, "both replicas served"
    print(f"8 concurrent streams on 2 CPU workers: {elapsed:.1f}s")
    assert httpx.get(server + "/stats").json()["requests"]["batches"] - batches_before < 8, "requests were batched"
    # a sampled answer depends on its seed, not on the requests it was batched with
    alone = stream(server, ask("Which company did the blue king build? (3)", retrieval="always", max_tokens=16,
                               temperature=1.0, seed=3))
    assert alone[-1]["answer"] == results[3][-1]["answer"]
    # a client that hangs up mid-answer stops its generation and frees its worker
    tokens_before = sum(w["tokens"] for w in httpx.get(server + "/stats").json()["workers"])
    with httpx.stream("POST", server + "/chat/completions", json=ask("blue river", max_tokens=200), timeout=30) as r:
        for line in r.iter_lines():
            if '"token"' in line:
                break
    deadline = time.time() + 20
    while httpx.get(server + "/health").json()["free_workers"] < 2:
        assert time.time() < deadline, "the hung-up request never released its worker"
        time.sleep(0.1)
    tokens_after = sum(w["tokens"] for w in httpx.get(server + "/stats").json()["workers"])
    assert tokens_after - tokens_before < 150, "generation went on after the client left"
    # an oversized request is refused, and the server keeps serving
    r = httpx.post(server + "/chat/completions", json=ask("x" * 100_000))
    assert r.status_code == 413 and "too long" in r.json()["error"]
    events = stream(server, ask("Osk", retrieval="always", max_tokens=8))
    assert events[-1]["type"] == "done"
    stats = httpx.get(server + "/stats").json()
    assert stats["requests"]["errors"] == 0 and stats["requests"]["rejected"] >= 1
    assert sum(w["requests"] for w in stats["workers"]) >= 10


def canned_stream():
    """A fixed SSE body: two searches (multi-hop), citations, and model output holding HTML."""
    kela, osk, script = (dict(d) for d in DOCS[:3])
    answer = "Kela Varo was born in Osk [1][3]. <img src=x onerror=alert(3)> [9]"
    events = [{"type": "search", "query": "Kela Varo birthplace"},
              {"type": "documents", "query": "Kela Varo birthplace", "documents": [dict(kela, number=1), dict(script, number=2)]},
              {"type": "search", "query": "Osk city"},
              {"type": "documents", "query": "Osk city", "documents": [dict(osk, number=3)]}]
    events += [{"type": "token", "text": answer[i:i + 7]} for i in range(0, len(answer), 7)]
    events += [{"type": "done", "answer": answer, "citations": [1, 3], "documents": [], "worker": 0}]
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events)


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} not found (apt-get install chromium)")
def test_browser(server, tmp_path):
    from playwright.sync_api import sync_playwright
    dialogs = []
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, viewport={"width": 1280, "height": 800},
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(server)
            page.wait_for_function("document.getElementById('info').textContent.includes('tiny')")
            assert f"{len(DOCS)} docs, bm25" in page.text_content("#info")
            page.select_option("#retrieval", "always")
            page.fill("#top-k", "2")

            # 1. a question: streamed text, and the Sources panel lists the retrieved titles
            page.fill("#input", "Where was Kela Varo born?")
            page.press("#input", "Enter")
            page.wait_for_selector(".msg.assistant.finished", timeout=30_000)
            answer = page.text_content(".msg.assistant .text")
            assert answer.strip()
            titles = page.locator("#sources .doc .title").all_text_contents()
            assert titles == ["[1] Kela Varo"], titles
            page.screenshot(path=str(tmp_path / "chat_web.png"))

            # 2. a follow-up (history is sent along) retrieving the <script> document: shown as text
            page.fill("#input", "script injection test document")
            page.click("#send")
            page.wait_for_selector(".msg.assistant.finished >> nth=1", timeout=30_000)
            assert page.locator(".msg.user").count() == 2
            doc = page.locator("#sources .doc", has_text="Script injection test")
            assert "<script>alert(1)</script>" in doc.locator(".text").text_content()
            assert page.locator("#sources script, #sources img").count() == 0
            page.screenshot(path=str(tmp_path / "chat_web_script.png"))

            # 3. an oversized question: the server's 4xx reason is shown, and the chat goes on
            page.fill("#input", "x" * 8001)
            page.click("#send")
            page.wait_for_selector(".msg.assistant.finished >> nth=2")
            assert "too long" in page.text_content(".msg.assistant >> nth=2")

            # 4. citations and multi-hop searches, on a canned stream (the tiny model cites nothing)
            page.route("**/chat/completions", lambda route: route.fulfill(
                status=200, headers={"content-type": "text/event-stream"}, body=canned_stream()))
            page.click("#new-chat")
            page.fill("#input", "Where was Kela Varo born?")
            page.click("#send")
            page.wait_for_selector(".msg.assistant.finished")
            msg = page.locator(".msg.assistant")
            assert msg.locator(".search").all_text_contents() == ["searched: Kela Varo birthplace", "searched: Osk city"]
            assert "<img src=x onerror=alert(3)>" in msg.locator(".text").text_content()
            assert page.locator("#messages img").count() == 0
            assert msg.locator("a.cite").all_text_contents() == ["[1]", "[3]"]   # [9] names no document: plain text
            groups = page.locator("#sources .group").all_text_contents()
            assert groups == ["Search: “Kela Varo birthplace”", "Search: “Osk city”"]
            msg.locator("a.cite", has_text="[3]").click()
            highlighted = page.locator("#sources .doc.highlight")
            assert highlighted.count() == 1 and highlighted.get_attribute("data-number") == "3"
            assert "Osk" in highlighted.locator(".title").text_content()
            page.screenshot(path=str(tmp_path / "chat_web_citations.png"))
            page.wait_for_timeout(200)   # a late dialog would still be caught
        finally:
            browser.close()
    assert dialogs == [], f"a dialog fired: {dialogs}"
    print(f"screenshots in {tmp_path}")
