"""
BPE tokenizer: trained with rustbpe, run with tiktoken, saved without pickle.

Also renders chat conversations into (ids, mask), where mask=1 marks the tokens the
model is trained to produce (assistant text, tool calls, search queries) and mask=0
everything it is given (user turns, retrieved documents, tool output).

Every piece of text in a conversation is encoded with one leading space (SentencePiece's
"dummy prefix"): the split pattern glues a space to the word after it, so "Lera" alone is
L|er|a while "in Lera" ends in |Ler|a. With the prefix a name is the same tokens in a
document, a question, a search and an answer, and reading becomes a plain token copy (a tiny
model copied every field but names, whose first token it had to re-spell, before this).
Inside a document every line that starts with a visible character gets the same prefix, so a value at the
start of a line (a list item, a table row, a record) is the tokens an answer would be.

Reading order (query_position, set per model from its checkpoint by load_model): where a question
goes relative to the documents retrieved for it. "after" (the default): documents, then the
question. "before": the question, then the documents. "both": the question, the documents, the
question again (JRT, "Just Read Twice"). A recurrent model that has seen the question first keeps
what is asked for instead of every fact. Masks do not change: nothing the model is given is trained
on. Searches the model writes itself (multi-hop) already come before their results.

Text prefix (text_prefix, also per model from its checkpoint): " " as above, or "" for chat models
imported from karpathy/nanochat, which were trained on message text without it.
"""
import os
import re
import copy
import json
import base64
import hashlib

import tiktoken

from nanochat.common import get_base_dir, atomic_write_text

QUERY_POSITIONS = ("after", "before", "both")
LINE_START = re.compile(r"\n(?=[^\s])")   # a line break before a line that starts with a visible character

SPECIAL_TOKENS = [
    "<|bos|>",              # every document / conversation starts with it
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",   # assistant calls the calculator tool
    "<|output_start|>", "<|output_end|>",   # the tool's answer, injected, never trained on
    # retrieval: fixed from day one so adding retrieval never resizes the vocabulary
    "<|doc_start|>", "<|doc_end|>",         # one retrieved document, injected, never trained on
    "<|search_start|>", "<|search_end|>",   # assistant writes a search query
]

# GPT-4 style split, but numbers split into groups of at most 2 digits (as nanochat) to save vocab
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

TRUNCATION_MARKER = " [...]"   # shown where a document was cut to fit its token budget
MIN_CUT_DOC_TOKENS = 32        # a document cut shorter than this shows little but its title line: dropped instead


class Tokenizer:
    """tiktoken Encoding + the special tokens + conversation rendering."""

    def __init__(self, enc):
        self.enc = enc
        self.special = {name: enc.encode_single_token(name) for name in SPECIAL_TOKENS}
        self.bos_token_id = self.special["<|bos|>"]
        self.query_position = "after"   # see the module docstring; a checkpoint's own comes with load_model
        self.text_prefix = " "          # likewise

    # ---- training / persistence -------------------------------------------------------------
    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size):
        import rustbpe
        num_merges_vocab = vocab_size - len(SPECIAL_TOKENS)
        if num_merges_vocab < 256:
            raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(text_iterator, num_merges_vocab, pattern=SPLIT_PATTERN)
        ranks = {bytes(k): v for k, v in bpe.get_mergeable_ranks()}
        return cls(_make_encoding(bpe.get_pattern(), ranks))

    def save(self, directory):
        """tokenizer.json (pattern + special ids) and tiktoken's own text format for the ranks."""
        os.makedirs(directory, exist_ok=True)
        ranks = self.enc._mergeable_ranks
        lines = [f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
        atomic_write_text(os.path.join(directory, "mergeable_ranks.tiktoken"), "\n".join(lines) + "\n")
        meta = {"format_version": 1, "pattern": self.enc._pat_str, "special_tokens": self.special}
        atomic_write_text(os.path.join(directory, "tokenizer.json"), json.dumps(meta, indent=2))

    @classmethod
    def from_directory(cls, directory):
        meta_path = os.path.join(directory, "tokenizer.json")
        ranks_path = os.path.join(directory, "mergeable_ranks.tiktoken")
        if not (os.path.exists(meta_path) and os.path.exists(ranks_path)):
            raise FileNotFoundError(f"no tokenizer in {directory} (run `python -m scripts.tok_train` first)")
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
            ranks = {}
            with open(ranks_path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        tok, rank = line.split()
                        ranks[base64.b64decode(tok)] = int(rank)
        except (ValueError, json.JSONDecodeError) as e:
            raise ValueError(f"corrupt tokenizer files in {directory}: {e}") from None
        return cls(_make_encoding(meta["pattern"], ranks))

    def fingerprint(self):
        """16 hex digits identifying the vocabulary (split pattern, merges, special tokens): checkpoints
        record it, so a model is never run with a tokenizer retrained since."""
        h = hashlib.sha256(self.enc._pat_str.encode())
        for tok, rank in sorted(self.enc._mergeable_ranks.items(), key=lambda kv: kv[1]):
            h.update(rank.to_bytes(4, "little") + tok)
        h.update(json.dumps(self.special, sort_keys=True).encode())
        return h.hexdigest()[:16]

    # ---- basic encode / decode --------------------------------------------------------------
    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def encode_special(self, name):
        return self.special[name]

    def id_to_token(self, idx):
        return self.enc.decode([idx])

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """Ordinary text only: special-token strings inside `text` are encoded as plain text."""
        pre = [self._as_id(prepend)] if prepend is not None else []
        post = [self._as_id(append)] if append is not None else []
        if isinstance(text, str):
            return pre + self.enc.encode_ordinary(text) + post
        rows = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
        return [pre + row + post for row in rows]

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    def decode(self, ids):
        return self.enc.decode(ids)

    def token_bytes(self):
        """Byte length of each token id (0 for special tokens): used for bits-per-byte."""
        specials = set(self.special.values())
        return [0 if i in specials else len(self.enc.decode_single_token_bytes(i)) for i in range(self.get_vocab_size())]

    def _as_id(self, x):
        return self.special[x] if isinstance(x, str) else x

    # ---- conversations ----------------------------------------------------------------------
    def encode_text(self, text):
        """A message or part body: with the leading space (see the module docstring)."""
        return self.encode(self.text_prefix + text)

    def decode_text(self, ids):
        """The inverse of encode_text: the decoded text without its leading space."""
        text = self.decode(ids)
        return text[len(self.text_prefix):] if text.startswith(self.text_prefix) else text

    def encode_document(self, doc, number):
        """The body of one document block: '[n] title' on the first line, then the text."""
        title = (doc.get("title") or "").strip()
        head = f"[{number}] {title}".rstrip()
        return self.encode(f"{head}\n") + self.encode_text(LINE_START.sub("\n" + self.text_prefix, doc.get("text", "")))

    def render_documents(self, documents, first_number=1, max_doc_tokens=None, room=None):
        """Token ids of document blocks, numbered from first_number. The Engine uses this to
        inject search results, so training and generation see identical blocks. max_doc_tokens caps
        each body; room (tokens, markers counted) keeps the blocks that fit_documents allows."""
        bodies = [self._cap(self.encode_document(doc, first_number + k), max_doc_tokens) for k, doc in enumerate(documents)]
        if room is not None:
            bodies = self.fit_documents(bodies, room)
        ids = []
        for body in bodies:
            ids += [self.special["<|doc_start|>"]] + body + [self.special["<|doc_end|>"]]
        return ids

    def fit_documents(self, bodies, room):
        """The document bodies to show within `room` tokens (each block's two markers counted), in
        the order given (rank order, and earlier searches before later ones): each whole while it
        fits; the first that does not fit is cut to the room left, ending in TRUNCATION_MARKER, if
        that keeps at least MIN_CUT_DOC_TOKENS of it, else dropped; every document after it is
        dropped. The best-ranked document is read whole rather than all of them cut short."""
        shown = []
        for body in bodies:
            if len(body) + 2 <= room:
                shown.append(body)
                room -= len(body) + 2
                continue
            if room - 2 >= MIN_CUT_DOC_TOKENS:
                shown.append(self._cap(body, room - 2))
            break
        return shown

    def _cap(self, body, cap):
        if cap is None or len(body) <= cap:
            return body
        marker = self.encode(TRUNCATION_MARKER)
        return body[:max(0, cap - len(marker))] + marker

    def render_conversation(self, conversation, max_tokens=2048, max_doc_tokens=None):
        """
        Tokenize a conversation {"messages": [...]} into (ids, mask).
        Messages: optional system (merged into the first user turn), then user/assistant
        alternating; a {"role": "retrieval", "documents": [...]} message may precede a user turn.
        Assistant content is a string or a list of parts of type text | python | python_output |
        search | search_results. An assistant message with "trained": False (an earlier turn given
        as history) is context: mask 0. Documents get the tokens the rest of the conversation leaves of
        max_tokens (fit_documents: in order, whole while they fit); only a conversation too long
        even without them is cut, at its tail. max_doc_tokens: optional cap on each document.
        """
        ids, mask = self._render(conversation, max_tokens, max_doc_tokens)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation, max_tokens=2048, max_doc_tokens=None):
        """Prompt for generation: the conversation without its final assistant turn, primed
        with <|assistant_start|>. Returns ids only. The question is never cut: a prompt too long
        even without documents loses its oldest tokens (after <|bos|>) instead."""
        messages = list(conversation["messages"])
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        # room for <|assistant_start|> at the end
        ids, _ = self._render({"messages": messages}, max_tokens - 1, max_doc_tokens)
        if len(ids) > max_tokens - 1:
            ids = ids[:1] + ids[len(ids) - (max_tokens - 2):]
        return ids + [self.special["<|assistant_start|>"]]

    def _render(self, conversation, max_tokens, max_doc_tokens):
        """(ids, mask) with the documents fitted to what the other tokens leave of max_tokens."""
        segments = self._conversation_segments(conversation)
        fixed = sum(len(toks) for kind, toks, _ in segments if kind == "tok")
        bodies = [self._cap(toks, max_doc_tokens) for kind, toks, _ in segments if kind == "doc"]
        shown = iter(self.fit_documents(bodies, max_tokens - fixed))
        start, end = self.special["<|doc_start|>"], self.special["<|doc_end|>"]
        ids, mask = [], []
        for kind, toks, m in segments:
            if kind == "doc":
                body = next(shown, None)   # shown is a prefix of the documents: once out, the rest are dropped
                if body is None:
                    continue
                toks = [start] + body + [end]
            ids += toks
            mask += [m] * len(toks)
        return ids, mask

    def _conversation_segments(self, conversation):
        """A conversation as a list of (kind, ids_or_doc_body, mask): kind 'tok' or 'doc'."""
        messages = copy.deepcopy(conversation["messages"])
        if messages and messages[0]["role"] == "system":
            if len(messages) < 2 or messages[1]["role"] != "user":
                raise ValueError("a system message must be followed by a user message")
            messages[1]["content"] = messages[0]["content"] + "\n\n" + messages[1]["content"]
            messages = messages[1:]
        S = self.special
        segs = [("tok", [self.bos_token_id], 0)]
        n_doc = 0
        expected = "user"
        pending = None   # a retrieval message's documents, placed when its question is
        if self.query_position not in QUERY_POSITIONS:
            raise ValueError(f"query_position must be one of {', '.join(QUERY_POSITIONS)}, got {self.query_position!r}")

        def add_docs(documents):
            nonlocal n_doc
            for doc in documents:
                n_doc += 1
                segs.append(("doc", self.encode_document(doc, n_doc), 0))

        for i, msg in enumerate(messages):
            role = msg.get("role")
            if role == "retrieval":
                nxt = messages[i + 1]["role"] if i + 1 < len(messages) else None
                if nxt != "user":
                    raise ValueError(f"message {i}: a retrieval message must come right before a user message")
                pending = msg["documents"]
                continue
            if role != expected:
                raise ValueError(f"message {i} is from {role!r} but should be from {expected!r}")
            content = msg["content"]
            if role == "user":
                if not isinstance(content, str):
                    raise ValueError(f"message {i}: user content must be a string")
                turn = ("tok", [S["<|user_start|>"]] + self.encode_text(content) + [S["<|user_end|>"]], 0)
                if pending is not None and self.query_position != "after":
                    segs.append(turn)
                if pending is not None:
                    add_docs(pending)
                if pending is None or self.query_position != "before":
                    segs.append(turn)
                pending = None
                expected = "assistant"
                continue
            segs.append(("tok", [S["<|assistant_start|>"]], 0))
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            written = 0 if msg.get("trained") is False else 1   # an earlier turn given as history: context, not a target
            for part in parts:
                kind = part["type"]
                if kind == "text":
                    segs.append(("tok", self.encode_text(part["text"]), written))
                elif kind == "python":
                    segs.append(("tok", [S["<|python_start|>"]] + self.encode_text(part["text"]) + [S["<|python_end|>"]], written))
                elif kind == "python_output":
                    segs.append(("tok", [S["<|output_start|>"]] + self.encode_text(part["text"]) + [S["<|output_end|>"]], 0))
                elif kind == "search":
                    segs.append(("tok", [S["<|search_start|>"]] + self.encode_text(part["text"]) + [S["<|search_end|>"]], written))
                elif kind == "search_results":
                    add_docs(part["documents"])
                else:
                    raise ValueError(f"message {i}: unknown assistant part type {kind!r}")
            segs.append(("tok", [S["<|assistant_end|>"]], written))
            expected = "user"
        return segs

    def visualize(self, ids, mask):
        """Debug view: supervised tokens green, the rest grey (ANSI)."""
        out = []
        for i, m in zip(ids, mask):
            color = "\033[92m" if m else "\033[90m"
            out.append(f"{color}{self.id_to_token(i)}\033[0m")
        return "|".join(out)


def _make_encoding(pattern, ranks):
    specials = {name: len(ranks) + k for k, name in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name="nanochat", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)


def get_tokenizer_dir():
    return os.path.join(get_base_dir(), "tokenizer")


def get_tokenizer():
    return Tokenizer.from_directory(get_tokenizer_dir())
