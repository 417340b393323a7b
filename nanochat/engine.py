"""
Batched sampling with an inference cache, and tools as a token-level state machine:

- calculator: the model writes <|python_start|>expr<|python_end|>; the Engine evaluates expr and
  injects <|output_start|>result<|output_end|>.
- search: the model writes <|search_start|>query<|search_end|>; the Engine asks the retriever
  (one batched call for all rows that searched this step) and injects the documents as
  <|doc_start|>[n] title\\ntext<|doc_end|> blocks, rendered by the same tokenizer code as training.

Many prompts (and several samples of each) generate together in one decode loop: one forward per
step for every row, plus one ragged forward for all rows that received an injected block that step.
Injected tokens get mask 0 (the model did not choose them: never trained on in RL) and draw on
their own budget, not on max_tokens. The model can never sample a token that only tools may write
(document and tool-output markers).

copy_answers=True: the answer is copied, not written. Each answer token must keep the answer text
a piece of the documents the row was shown (its prompt's and its searches') or of ABSTAIN, so a
value is copied whole instead of garbled; a row that was shown no documents answers freely, and
searches, tools and stopping stay the model's choice. Off in RL: its policy gradient scores the
model's own distribution.
"""
import ast
import operator
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from nanochat.gpt import InferenceCache
from nanochat.rag import ABSTAIN

# ---- calculator -------------------------------------------------------------------------------
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNOPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _eval_node(node):
    if isinstance(node, ast.Expression):
        return _eval_node(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval_node(node.left), _eval_node(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6):
            raise ValueError("exponent too large")
        return _BINOPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNOPS:
        return _UNOPS[type(node.op)](_eval_node(node.operand))
    # "strawberry".count("r"): the one method call the calculator allows
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and len(node.args) == 1 and not node.keywords):
        target, arg = _eval_node(node.func.value), _eval_node(node.args[0])
        if isinstance(target, str) and isinstance(arg, str):
            return target.count(arg)
    raise ValueError("unsupported expression")


def use_calculator(expr):
    """Evaluate arithmetic (or str.count) safely by walking the AST; None if not allowed."""
    expr = expr.replace(",", "").strip()
    if not expr or len(expr) > 200:
        return None
    try:
        value = _eval_node(ast.parse(expr, mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError, RecursionError):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value


# ---- sampling ---------------------------------------------------------------------------------
def sample_next_token(logits, generator, temperature=1.0, top_k=None):
    """logits (B, V) -> (B,) token ids. temperature 0 is greedy. Sampling inverts each row's CDF
    at one uniform draw: the same distribution as torch.multinomial, ~10x faster for 64 x 4096."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    idx = None
    if top_k is not None and top_k > 0:
        logits, idx = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(probs.size(0), 1, generator=generator, device=probs.device) * cdf[:, -1:]
    choice = torch.searchsorted(cdf, u).clamp_(max=probs.size(-1) - 1)
    return (choice if idx is None else idx.gather(1, choice)).squeeze(1)


def as_prompts(prompts):
    """One prompt (a list of token ids) or a list of prompts -> a list of prompts."""
    return [prompts] if prompts and isinstance(prompts[0], int) else prompts


@dataclass
class RowState:
    """One sample being generated: its tokens, and its completion as conversation parts."""
    tokens: list
    mask: list
    prompt: int = 0                               # which of the prompts this row continues
    parts: list = field(default_factory=list)     # {"type": "text"|"python"|"python_output"|"search"|"search_results", ...}
    mode: str = "text"                            # what the sampled tokens currently belong to
    pending: list = field(default_factory=list)   # token ids of the part being written
    num_searches: int = 0
    num_docs_shown: int = 0
    injected_tokens: int = 0
    completed: bool = False
    sources: list = field(default_factory=list)   # copy_answers: bytes of the documents shown so far
    scanned: int = 0                              # how much of tokens was searched for documents


ANSWER_ROOM = 32   # context kept free after injected documents: the next search or the answer


@lru_cache(maxsize=4)
def word_pieces(tokenizer):
    """copy_answers' tables, built once per tokenizer (chat_web makes an Engine per batch): the bytes of
    every token id (b"" for special tokens), bytes -> id, and the longest piece's length."""
    special = set(tokenizer.special.values())
    piece = [b"" if i in special else tokenizer.enc.decode_single_token_bytes(i) for i in range(tokenizer.get_vocab_size())]
    return piece, {b: i for i, b in enumerate(piece) if b}, max(len(b) for b in piece)


class Engine:
    def __init__(self, model, tokenizer, retriever=None, search_top_k=3, max_searches=4, max_injected_tokens=2048,
                 copy_answers=False):
        self.model, self.tokenizer, self.retriever = model, tokenizer, retriever
        self.copy_answers = copy_answers
        self.search_top_k, self.max_searches, self.max_injected_tokens = search_top_k, max_searches, max_injected_tokens
        # search results get what is left of the model's context after ANSWER_ROOM tokens for what it writes next
        config = getattr(model, "config", None)
        self.context_len = getattr(config, "sequence_len", None)
        S = tokenizer.special
        self.S = S
        self.banned = [S[t] for t in ("<|doc_start|>", "<|doc_end|>", "<|output_start|>", "<|output_end|>")]
        self.stop_tokens = {S["<|assistant_end|>"], S["<|bos|>"]}
        self.special_ids = set(S.values())
        if copy_answers:
            self.piece, self.piece_id, self.longest_piece = word_pieces(tokenizer)
            self.abstain = ABSTAIN.encode()
            self.text_prefix = tokenizer.text_prefix.encode()
            self.first_pieces = {}   # (document bytes, opened) -> the pieces an answer can start with there

    def _copyable(self, row):
        """copy_answers: the ids of the word pieces that keep the row's answer a piece of the documents
        it was shown (or of ABSTAIN), or None when it was shown none (the answer is free)."""
        start, end = self.S["<|doc_start|>"], self.S["<|doc_end|>"]
        while True:   # documents that arrived since the last call: prompt blocks, then injected ones
            try:
                a = row.tokens.index(start, row.scanned)
                b = row.tokens.index(end, a)
            except ValueError:
                break
            row.sources.append(b"".join(self.piece[t] for t in row.tokens[a + 1:b]))
            row.scanned = b + 1
        if not row.sources:
            return None
        # an answer opens with the text prefix (a space) whatever precedes the value in the document
        # (a tab, a bracket, a line start): the prefix is matched as any separator
        prefix = self.text_prefix
        answer = b"".join(self.piece[t] for t in row.pending)
        opened = answer.startswith(prefix) if prefix else True
        if opened:
            answer = answer[len(prefix):]
        elif answer:
            opened = True   # no prefix written: the answer began at its first word piece
        allowed = set() if opened or prefix not in self.piece_id else {self.piece_id[prefix]}
        for src in row.sources + [self.abstain]:
            allowed |= self._continuations(src, answer, opened)
        return allowed

    def _continuations(self, src, answer, opened):
        """The ids of the word pieces that continue `answer` somewhere in `src` (also with the text prefix
        in front while the answer is not opened). Every position continues the empty answer: that set is
        kept per document, since every row and every search starts there."""
        key = None if answer else (src, opened)
        if key in self.first_pieces:
            return self.first_pieces[key]
        found, prefix = set(), self.text_prefix
        at = src.find(answer)
        while at != -1:
            after = at + len(answer)
            for n in range(1, min(self.longest_piece, len(src) - after) + 1):
                piece = src[after:after + n]
                for candidate in ((piece,) if opened or not prefix else (piece, prefix + piece)):
                    tid = self.piece_id.get(candidate)
                    if tid is not None:
                        found.add(tid)
            at = src.find(answer, at + 1)
        if key is not None:
            if len(self.first_pieces) >= 4096:
                self.first_pieces.clear()
            self.first_pieces[key] = found
        return found

    def _flush_text(self, row):
        if row.pending:
            text = self.tokenizer.decode_text(row.pending)
            if row.parts and row.parts[-1]["type"] == "text":
                row.parts[-1]["text"] += text
            else:
                row.parts.append({"type": "text", "text": text})
            row.pending = []

    def _consume(self, row, tok):
        """Advance the row's tool state machine by one sampled token. Returns an injection
        (list of ids) for the calculator, ("search", query) for a search, or None."""
        S = self.S
        if tok in self.stop_tokens:
            if row.mode == "text":
                self._flush_text(row)
            row.completed = True
            return None
        if tok not in self.special_ids:   # the common case: a word piece of the current part
            row.pending.append(tok)
            return None
        if row.mode == "text":
            if tok == S["<|python_start|>"]:
                self._flush_text(row)
                row.mode = "python"
            elif tok == S["<|search_start|>"]:
                self._flush_text(row)
                row.mode = "search"
            return None   # a stray control token is kept in the tokens, not in the text
        end = S["<|python_end|>"] if row.mode == "python" else S["<|search_end|>"]
        if tok != end:
            return None
        text = self.tokenizer.decode_text(row.pending)
        row.pending, mode, row.mode = [], row.mode, "text"
        row.parts.append({"type": mode, "text": text})
        if mode == "search":
            return ("search", text.strip())
        result = use_calculator(text)
        if result is None:
            return None
        row.parts.append({"type": "python_output", "text": str(result)})
        return [S["<|output_start|>"]] + self.tokenizer.encode_text(str(result)) + [S["<|output_end|>"]]

    def _search_blocks(self, rows, searches, retrievers, top_ks):
        """Run all rows' searches, one batched retriever call per knowledge base; return
        {row_index: injected ids}."""
        blocks = {}
        todo = {}   # (id(retriever), top_k) -> (retriever, top_k, [(row index, query)])
        for i, query in searches:
            row = rows[i]
            row.num_searches += 1
            if retrievers[row.prompt] is None or not query:
                # no retriever or an empty query: an empty result, so the model sees its search failed
                row.parts.append({"type": "search_results", "documents": []})
                continue
            retriever, top_k = retrievers[row.prompt], top_ks[row.prompt]
            todo.setdefault((id(retriever), top_k), (retriever, top_k, []))[2].append((i, query))
        for retriever, top_k, group in todo.values():
            results = retriever.search_batch([q for _, q in group], top_k)
            for (i, _), hits in zip(group, results):
                row = rows[i]
                docs = [dict(h.document.to_dict(), id=h.document.doc_id) for h in hits]   # a chunk counts as its document
                room = self.max_injected_tokens - row.injected_tokens
                if self.context_len:
                    room = min(room, self.context_len - len(row.tokens) - ANSWER_ROOM)
                # the same rule as a rendered conversation (Tokenizer.fit_documents): in rank order, whole while they fit
                ids = self.tokenizer.render_documents(docs, row.num_docs_shown + 1, room=room)
                docs = docs[:ids.count(self.S["<|doc_start|>"])]
                row.parts.append({"type": "search_results", "documents": docs})
                row.num_docs_shown += len(docs)
                if ids:
                    blocks[i] = ids
        return blocks

    @staticmethod
    def _sample_per_prompt(logits, live_rows, generators, temperature, top_k):
        """Next tokens for the cache rows, each prompt's rows with its own settings and generator;
        finished rows draw nothing (so a prompt's samples do not depend on its neighbours)."""
        out = torch.zeros(len(live_rows), dtype=torch.long, device=logits.device)
        groups = {}
        for j, row in enumerate(live_rows):
            if not row.completed:
                groups.setdefault(row.prompt, []).append(j)
        for p, js in groups.items():
            idx = torch.tensor(js, device=logits.device)
            out[idx] = sample_next_token(logits[idx], generators[p], temperature[p], top_k[p])
        return out

    def _feed(self, cache, rows, seqs):
        """Feed row rows[j] the tokens seqs[j], all rows in one right-padded forward; returns the
        logits after each row's last token, (len(rows), V)."""
        device = cache.lengths.device
        T = max(len(s) for s in seqs)
        x = torch.zeros(len(seqs), T, dtype=torch.long)
        for j, s in enumerate(seqs):
            x[j, :len(s)] = torch.tensor(s)
        lengths = torch.tensor([len(s) for s in seqs], device=device)
        return self.model(x.to(device), cache=cache, rows=rows, lengths=lengths)

    @torch.no_grad()
    def generate(self, prompts, num_samples=1, max_tokens=256, temperature=1.0, top_k=None, seed=42,
                 retrievers=None, top_ks=None):
        """
        prompts: one prompt (a list of token ids) or a list of prompts, generated together: row
        p * num_samples + s is sample s of prompt p (RowState.prompt = p). retrievers / top_ks: one
        per prompt (each question may search its own knowledge base); default the Engine's.
        max_tokens, temperature, top_k (sampling) and seed are one value for all, or a list with one
        per prompt (chat_web batches requests with their own settings): with a list of seeds each
        prompt samples from its own generator, so its rows do not depend on what else is in the batch.
        Yields one step at a time: (new_tokens, new_masks, rows), where new_tokens[i] are the tokens
        row i gained this step (the sampled one, then any injected block) and new_masks[i] their
        masks (1 sampled, 0 injected). `rows` are the RowState objects (parts, counters); a caller
        may set a row's `completed` between steps to stop it (a client that went away).
        """
        prompts = as_prompts(prompts)
        assert prompts and all(isinstance(p, list) and p for p in prompts), "expected prompts of token ids"
        P = len(prompts)
        retrievers = retrievers or [self.retriever] * P
        top_ks = top_ks or [self.search_top_k] * P
        per_prompt = any(isinstance(v, (list, tuple)) for v in (max_tokens, temperature, top_k, seed))
        max_tokens, temperature, top_k, seed = (list(v) if isinstance(v, (list, tuple)) else [v] * P
                                                for v in (max_tokens, temperature, top_k, seed))
        if not all(len(v) == P for v in (retrievers, top_ks, max_tokens, temperature, top_k, seed)):
            raise ValueError(f"per-prompt settings need one value for each of the {P} prompts")
        model, n = self.model, num_samples
        device = model.lm_head.weight.device
        generators = [torch.Generator(device=device).manual_seed(s) for s in (seed if per_prompt else seed[:1])]
        B = P * n
        # room for the longest prompt and max_tokens; documents grow the cache when they come
        cache = InferenceCache(model, B, max(len(p) for p in prompts) + max(max_tokens) + 64, device)
        # prefill the first sample of each prompt (all prompts in one ragged forward), copy to the others
        logits = self._feed(cache, list(range(0, B, n)), prompts).repeat_interleave(n, dim=0)
        if n > 1:
            cache.fan_out(n)
        rows = [RowState(tokens=list(prompts[i // n]), mask=[0] * len(prompts[i // n]), prompt=i // n) for i in range(B)]
        not_tokens = torch.zeros(logits.size(-1), dtype=torch.bool, device=device)
        not_tokens[self.banned] = True
        not_tokens[self.tokenizer.get_vocab_size():] = True   # padding rows of the embedding are not tokens
        live = list(range(B))   # cache row j holds rows[live[j]]; finished rows are dropped in batches
        copy_forbidden = torch.ones(logits.size(-1), dtype=torch.bool, device=device)   # word pieces, until allowed
        copy_forbidden[sorted(self.special_ids)] = False
        steps = max(max_tokens)
        for step in range(steps):
            if all(rows[i].completed for i in live):
                break
            logits.masked_fill_(not_tokens, float("-inf"))
            capped = [j for j, i in enumerate(live) if rows[i].num_searches >= self.max_searches]
            if capped:   # out of searches: the row must answer with what it has (no loop of empty searches)
                logits[capped, self.S["<|search_start|>"]] = float("-inf")
            if self.copy_answers:
                for j, i in enumerate(live):
                    row = rows[i]
                    allowed = None if row.completed or row.mode != "text" else self._copyable(row)
                    if allowed is not None:   # special tokens stay the model's choice
                        forbidden = copy_forbidden.clone()
                        forbidden[torch.tensor(sorted(allowed), dtype=torch.long, device=device)] = False
                        logits[j].masked_fill_(forbidden, float("-inf"))
            if per_prompt:
                sampled_t = self._sample_per_prompt(logits, [rows[i] for i in live], generators, temperature, top_k)
            else:
                sampled_t = sample_next_token(logits, generators[0], temperature[0], top_k[0])
            sampled = sampled_t.tolist()
            new_tokens = [[] for _ in rows]
            new_masks = [[] for _ in rows]
            injections, searches = {}, []   # keyed by cache row
            for j, i in enumerate(live):
                row = rows[i]
                if row.completed:
                    continue
                tok = sampled[j]
                row.tokens.append(tok)
                row.mask.append(1)
                new_tokens[i].append(tok)
                new_masks[i].append(1)
                action = self._consume(row, tok)
                if max_tokens[row.prompt] < steps and step + 1 >= max_tokens[row.prompt] and not row.completed:
                    # its own, lower limit: cut off here (the others go on)
                    if row.mode == "text":
                        self._flush_text(row)
                    row.completed, action = True, None
                if isinstance(action, tuple):
                    searches.append((j, action[1]))
                elif action and row.injected_tokens + len(action) <= self.max_injected_tokens:
                    injections[j] = action
            if searches:
                injections.update(self._search_blocks([rows[i] for i in live], searches, retrievers, top_ks))
            # every cache row takes its sampled token in one forward (a row that just finished too:
            # its output is never read, and a full batch reads the cache through views, not gathers) ...
            logits = model(sampled_t.view(-1, 1), cache=cache)[:, -1, :]
            # ... then the rows with an injection take their blocks, all in one ragged forward
            if injections:
                for j, block in injections.items():
                    i = live[j]
                    row = rows[i]
                    row.tokens += block
                    row.mask += [0] * len(block)
                    row.injected_tokens += len(block)
                    new_tokens[i] += block
                    new_masks[i] += [0] * len(block)
                inj_rows = list(injections)
                logits[inj_rows] = self._feed(cache, inj_rows, list(injections.values()))
            yield new_tokens, new_masks, rows
            # once a quarter of the batch has finished, drop the finished rows from the cache
            running = [j for j, i in enumerate(live) if not rows[i].completed]
            if running and 4 * (len(live) - len(running)) >= len(live):
                cache.keep(running)
                logits = logits[running]
                live = [live[j] for j in running]
        for row in rows:   # a row cut off by max_tokens keeps what it wrote so far
            if row.mode == "text":
                self._flush_text(row)

    @torch.no_grad()
    def generate_ensemble(self, groups, weights=None, max_tokens=64, temperature=0.0, top_k=None, seed=42):
        """REPLUG / RAG-Token decoding: each group is one answer, given as k prompts (the same question
        after each of k documents, one per prompt). Every step the next-token distribution is
        sum_d lambda_d p(. | prompt_d) over the group's rows, one token is chosen from it and fed to
        all of them (each row keeps its own KV cache / Mamba state). weights: per group, k lambdas
        summing to 1 (default uniform). Tools are off (no searches, no calculator): the documents
        were retrieved once, before. Yields per step the list of tokens each group gained
        ([] once it finished); the stop token is not yielded."""
        assert groups and all(g and all(isinstance(p, list) and p for p in g) for g in groups), "expected groups of prompts"
        model, device = self.model, self.model.lm_head.weight.device
        sizes = [len(g) for g in groups]
        if weights is None:
            weights = [[1.0 / k] * k for k in sizes]
        if [len(w) for w in weights] != sizes:
            raise ValueError("weights: one lambda per prompt of each group")
        prompts = [p for g in groups for p in g]
        owner = torch.tensor([gi for gi, k in enumerate(sizes) for _ in range(k)], device=device)
        ends = torch.tensor(sizes).cumsum(0).tolist()
        spans = list(zip([0] + ends[:-1], ends))   # each group's rows, contiguous
        log_lambda = torch.log(torch.tensor([w for ws in weights for w in ws], dtype=torch.float32, device=device))
        cache = InferenceCache(model, len(prompts), max(len(p) for p in prompts) + max_tokens + 1, device)
        logits = self._feed(cache, list(range(len(prompts))), prompts)
        generator = torch.Generator(device=device).manual_seed(seed)
        S = self.S
        not_tokens = torch.zeros(logits.size(-1), dtype=torch.bool, device=device)
        not_tokens[self.banned + [S["<|python_start|>"], S["<|search_start|>"]]] = True
        not_tokens[self.tokenizer.get_vocab_size():] = True
        done = [False] * len(groups)
        for _ in range(max_tokens):
            logp = torch.log_softmax(logits.float().masked_fill(not_tokens, float("-inf")), dim=-1) + log_lambda[:, None]
            mixture = torch.stack([torch.logsumexp(logp[a:b], dim=0) for a, b in spans])   # log sum_d lambda_d p_d
            chosen = sample_next_token(mixture, generator, temperature, top_k)
            out = []
            for gi, tok in enumerate(chosen.tolist()):
                if done[gi]:
                    out.append([])
                    continue
                done[gi] = tok in self.stop_tokens
                out.append([] if done[gi] else [tok])
            yield out
            if all(done):
                break
            logits = model(chosen[owner].view(-1, 1), cache=cache)[:, -1, :]

    def generate_batch(self, prompts, num_samples=1, keep_stop=False, **kwargs):
        """Run generate to the end. Returns the RowStates (prompt-major, as generate): .tokens
        (prompt + completion; the stop token only with keep_stop, as RL wants: stopping is a choice
        too), .mask, .parts."""
        prompts = as_prompts(prompts)
        rows = None
        for _, _, rows in self.generate(prompts, num_samples, **kwargs):
            pass
        if rows is None:   # max_tokens == 0
            return [RowState(tokens=list(p), mask=[0] * len(p), prompt=i) for i, p in enumerate(prompts) for _ in range(num_samples)]
        for row in rows:
            if not keep_stop and row.tokens[-1] in self.stop_tokens:
                row.tokens.pop()
                row.mask.pop()
        return rows
