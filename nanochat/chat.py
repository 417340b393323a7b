"""
One conversation builder for every front end (chat_cli, chat_web): it assembles the prompt for
a retrieval mode, runs the Engine, and reports what happened as a stream of events:

  {"type": "search", "query": q}                      the model searched (mode auto)
  {"type": "documents", "query": q, "documents": [..]} documents shown to the model, numbered
  {"type": "token", "text": t}                        answer text as it is generated (UTF-8 safe)
  {"type": "done", "answer": text, "parts": [...], "documents": [...], "citations": [n, ...]}

Retrieval modes: "always" retrieves for every user turn and puts the documents before it (RAG);
"ensemble" retrieves the same documents but reads each one on its own and mixes the next-token
distributions, weighted by retrieval score (REPLUG); "auto" lets the model write its own searches
(the Engine's search tool); "off" uses no KB.
"""
import re

from nanochat.engine import Engine
from nanochat.rollout import ensemble_prompts, ensemble_weights

RETRIEVAL_MODES = ("auto", "always", "ensemble", "off")
CITATION = re.compile(r"\[(\d{1,3})\]")


def build_conversation(messages, mode, retriever, top_k):
    """messages: [{"role": "user"|"assistant", "content": str}, ...] ending with a user turn.
    Returns (conversation, shown_documents) where shown documents come first in the prompt."""
    conversation = {"messages": [dict(m) for m in messages]}
    if mode not in ("always", "ensemble") or retriever is None:
        return conversation, []
    query = messages[-1]["content"]
    documents = [hit.document.to_dict() for hit in retriever.search(query, top_k)]
    # documents go right before the last user turn, as in training (RAGTask)
    conversation["messages"].insert(len(messages) - 1, {"role": "retrieval", "documents": documents})
    return conversation, documents


def respond(model, tokenizer, messages, mode="auto", retriever=None, top_k=3, temperature=0.0,
            top_k_sampling=None, max_tokens=256, seed=42, max_searches=4, copy_answers=False):
    """Generate one assistant turn; yields the events described at the top of this file.
    copy_answers: the answer is copied from the documents shown (Engine), when there are any."""
    request = {"messages": messages, "mode": mode, "top_k": top_k, "temperature": temperature,
               "top_k_sampling": top_k_sampling, "max_tokens": max_tokens, "seed": seed}
    for _, event in respond_batch(model, tokenizer, [request], retriever, max_searches, copy_answers=copy_answers):
        yield event


def respond_batch(model, tokenizer, requests, retriever=None, max_searches=4, stopped=lambda i: False, copy_answers=False):
    """Answer several conversations at once, in one Engine run (chat_web batches the requests that
    arrive together). requests: dicts with respond()'s arguments (messages, mode, top_k, temperature,
    top_k_sampling, max_tokens, seed). Yields (request index, event); each request's events are
    exactly what respond() would yield for it alone. stopped(i) True: request i is given up (its
    client went away): its row stops and yields nothing more."""
    for r in requests:
        if r["mode"] not in RETRIEVAL_MODES:
            raise ValueError(f"retrieval mode must be one of {', '.join(RETRIEVAL_MODES)}, got {r['mode']!r}")
    streams, prompts, ensembles = [], [], {}
    for i, r in enumerate(requests):
        conversation, shown = build_conversation(r["messages"], r["mode"], retriever, r["top_k"])
        streams.append(_EventStream(tokenizer, shown))
        if shown:
            yield i, {"type": "documents", "query": r["messages"][-1]["content"], "documents": list(streams[i].documents)}
        budget = model.config.sequence_len - r["max_tokens"]
        if r["mode"] == "ensemble" and shown:
            conversation["messages"] = fit_conversation(tokenizer, conversation, budget)
            ensembles[i] = ensemble_prompts(tokenizer, conversation, budget)
        else:
            prompts.append((i, fit_prompt(tokenizer, conversation, budget)))
    if ensembles:
        yield from _respond_ensemble(model, tokenizer, requests, ensembles, streams, stopped)
    if not prompts:
        return
    engine = Engine(model, tokenizer, max_searches=max_searches, copy_answers=copy_answers)
    each = lambda key: [requests[i][key] for i, _ in prompts]   # one setting, per request
    rows = None
    for _, _, rows in engine.generate([p for _, p in prompts], 1, max_tokens=each("max_tokens"),
                                      temperature=each("temperature"), top_k=each("top_k_sampling"), seed=each("seed"),
                                      top_ks=each("top_k"), retrievers=[retriever if requests[i]["mode"] == "auto" else None
                                                                        for i, _ in prompts]):
        for (i, _), row in zip(prompts, rows):
            if streams[i].closed:
                continue
            if stopped(i):
                row.completed, streams[i].closed = True, True
                continue
            for event in streams[i].step(row):
                yield i, event
            if row.completed:   # done now: its answer need not wait for the rest of the batch
                for event in streams[i].finish(row.parts):
                    yield i, event
    for k, (i, _) in enumerate(prompts):
        if not streams[i].closed:
            for event in streams[i].finish(rows[k].parts if rows is not None else []):
                yield i, event


def _respond_ensemble(model, tokenizer, requests, ensembles, streams, stopped):
    """The ensemble-mode requests, decoded together (Engine.generate_ensemble, greedy: the mixture is
    the point; sampling settings do not apply)."""
    order = list(ensembles)
    groups = [ensembles[i][0] for i in order]
    weights = [ensemble_weights(ensembles[i][1]) for i in order]
    engine = Engine(model, tokenizer)
    tokens = {i: [] for i in order}
    for step in engine.generate_ensemble(groups, weights, max_tokens=max(requests[i]["max_tokens"] for i in order)):
        for i, new in zip(order, step):
            if streams[i].closed or len(tokens[i]) >= requests[i]["max_tokens"]:
                continue
            if stopped(i):
                streams[i].closed = True
                continue
            tokens[i] += new
            text = tokenizer.decode_text(tokens[i])
            if not text.endswith("\ufffd") and len(text) > len(streams[i].emitted):
                yield i, {"type": "token", "text": text[len(streams[i].emitted):]}
                streams[i].emitted = text
    for i in order:
        if not streams[i].closed:
            text = tokenizer.decode_text(tokens[i])
            for event in streams[i].finish([{"type": "text", "text": text}] if text else []):
                yield i, event


class _EventStream:
    """One request's events from its row's state, step by step: searches, documents, new text."""

    def __init__(self, tokenizer, shown):
        self.tokenizer = tokenizer
        self.documents = [dict(d, number=k + 1) for k, d in enumerate(shown)]
        self.emitted, self.seen_parts, self.closed = "", 0, False

    def step(self, row):
        events = []
        for part in row.parts[self.seen_parts:]:   # new search / search_results parts since the last step
            if part["type"] == "search":
                events.append({"type": "search", "query": part["text"]})
            elif part["type"] == "search_results":
                docs = [dict(d, number=len(self.documents) + k + 1) for k, d in enumerate(part["documents"])]
                self.documents += docs
                events.append({"type": "documents", "query": _last_query(row.parts), "documents": docs})
        self.seen_parts = len(row.parts)
        pending = self.tokenizer.decode_text(row.pending) if row.mode == "text" else ""
        visible = _answer_text(row.parts) + pending
        # half of a multi-byte character: wait for the rest
        if not visible.endswith("\ufffd") and len(visible) > len(self.emitted) and visible.startswith(self.emitted):
            events.append({"type": "token", "text": visible[len(self.emitted):]})
            self.emitted = visible
        return events

    def finish(self, parts):
        self.closed = True
        answer = _answer_text(parts)
        if len(answer) > len(self.emitted) and answer.startswith(self.emitted):
            yield {"type": "token", "text": answer[len(self.emitted):]}
        cited = sorted({int(n) for n in CITATION.findall(answer) if 1 <= int(n) <= len(self.documents)})
        yield {"type": "done", "answer": answer, "parts": parts, "documents": self.documents, "citations": cited}


def fit_conversation(tokenizer, conversation, budget):
    """The messages that fit `budget` tokens: the oldest turns go first, so the latest question
    always stays (documents before it shrink before it is ever cut, see fit_prompt)."""
    messages = conversation["messages"]
    while True:
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        later_users = [i for i, m in enumerate(messages) if m["role"] == "user" and i > first_user]
        if len(tokenizer.render_for_completion({"messages": messages}, max_tokens=10 ** 9)) <= budget or not later_users:
            return messages
        # drop everything before the second user turn (and its retrieval message, if any)
        cut = later_users[0]
        if messages[cut - 1]["role"] == "retrieval":
            cut -= 1
        messages = messages[cut:]


def fit_prompt(tokenizer, conversation, budget):
    """The prompt for the next answer within `budget` tokens (fit_conversation, then the documents
    of what is left are cut to fit)."""
    return tokenizer.render_for_completion({"messages": fit_conversation(tokenizer, conversation, budget)}, max_tokens=budget)


def _answer_text(parts):
    """The text the user sees: every text part (searches and documents are shown separately)."""
    return "".join(p["text"] for p in parts if p["type"] == "text")


def _last_query(parts):
    for part in reversed(parts):
        if part["type"] == "search":
            return part["text"]
    return ""
