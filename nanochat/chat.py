"""
One conversation builder for every front end (chat_cli, chat_web): it assembles the prompt for
a retrieval mode, runs the Engine, and reports what happened as a stream of events:

  {"type": "search", "query": q}                      the model searched (mode auto)
  {"type": "documents", "query": q, "documents": [..]} documents shown to the model, numbered
  {"type": "token", "text": t}                        answer text as it is generated (UTF-8 safe)
  {"type": "done", "answer": text, "parts": [...], "documents": [...], "citations": [n, ...]}

Retrieval modes: "always" retrieves for every user turn and puts the documents before it (RAG);
"auto" lets the model write its own searches (the Engine's search tool); "off" uses no KB.
"""
import re

from nanochat.engine import Engine

RETRIEVAL_MODES = ("auto", "always", "off")
CITATION = re.compile(r"\[(\d{1,3})\]")


def build_conversation(messages, mode, retriever, top_k):
    """messages: [{"role": "user"|"assistant", "content": str}, ...] ending with a user turn.
    Returns (conversation, shown_documents) where shown documents come first in the prompt."""
    conversation = {"messages": [dict(m) for m in messages]}
    if mode != "always" or retriever is None:
        return conversation, []
    query = messages[-1]["content"]
    documents = [hit.document.to_dict() for hit in retriever.search(query, top_k)]
    # documents go right before the last user turn, as in training (RAGTask)
    conversation["messages"].insert(len(messages) - 1, {"role": "retrieval", "documents": documents})
    return conversation, documents


def respond(model, tokenizer, messages, mode="auto", retriever=None, top_k=3, temperature=0.0,
            top_k_sampling=None, max_tokens=256, seed=42, max_searches=4):
    """Generate one assistant turn; yields the events described at the top of this file."""
    if mode not in RETRIEVAL_MODES:
        raise ValueError(f"retrieval mode must be one of {', '.join(RETRIEVAL_MODES)}, got {mode!r}")
    conversation, shown = build_conversation(messages, mode, retriever, top_k)
    all_docs = [dict(d, number=k + 1) for k, d in enumerate(shown)]
    if shown:
        yield {"type": "documents", "query": messages[-1]["content"], "documents": list(all_docs)}
    engine = Engine(model, tokenizer, retriever=retriever if mode == "auto" else None,
                    search_top_k=top_k, max_searches=max_searches)
    prompt = fit_prompt(tokenizer, conversation, model.config.sequence_len - max_tokens)
    emitted, seen_parts = "", 0
    row = None
    for _, _, rows in engine.generate(prompt, 1, max_tokens=max_tokens, temperature=temperature,
                                      top_k=top_k_sampling, seed=seed):
        row = rows[0]
        # new search / search_results parts since the last step
        for part in row.parts[seen_parts:]:
            if part["type"] == "search":
                yield {"type": "search", "query": part["text"]}
            elif part["type"] == "search_results":
                docs = [dict(d, number=len(all_docs) + k + 1) for k, d in enumerate(part["documents"])]
                all_docs += docs
                yield {"type": "documents", "query": _last_query(row.parts), "documents": docs}
        seen_parts = len(row.parts)
        visible = _answer_text(row.parts) + (tokenizer.decode_text(row.pending) if row.mode == "text" else "")
        if visible.endswith("\ufffd"):   # half of a multi-byte character: wait for the rest
            continue
        if len(visible) > len(emitted) and visible.startswith(emitted):
            yield {"type": "token", "text": visible[len(emitted):]}
            emitted = visible
    parts = row.parts if row is not None else []
    answer = _answer_text(parts)
    if len(answer) > len(emitted) and answer.startswith(emitted):
        yield {"type": "token", "text": answer[len(emitted):]}
    cited = sorted({int(n) for n in CITATION.findall(answer) if 1 <= int(n) <= len(all_docs)})
    yield {"type": "done", "answer": answer, "parts": parts, "documents": all_docs, "citations": cited}


def fit_prompt(tokenizer, conversation, budget):
    """The prompt for the next answer within `budget` tokens: the oldest turns go first, so the
    latest question always stays (documents before it shrink before it is ever cut)."""
    messages = conversation["messages"]
    while True:
        prompt = tokenizer.render_for_completion({"messages": messages}, max_tokens=10 ** 9)
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        later_users = [i for i, m in enumerate(messages) if m["role"] == "user" and i > first_user]
        if len(prompt) <= budget or not later_users:
            return tokenizer.render_for_completion({"messages": messages}, max_tokens=budget)
        # drop everything before the second user turn (and its retrieval message, if any)
        cut = later_users[0]
        if messages[cut - 1]["role"] == "retrieval":
            cut -= 1
        messages = messages[cut:]


def _answer_text(parts):
    """The text the user sees: every text part (searches and documents are shown separately)."""
    return "".join(p["text"] for p in parts if p["type"] == "text")


def _last_query(parts):
    for part in reversed(parts):
        if part["type"] == "search":
            return part["text"]
    return ""
