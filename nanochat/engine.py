"""
Batched sampling with an inference cache, and tools as a token-level state machine:

- calculator: the model writes <|python_start|>expr<|python_end|>; the Engine evaluates expr and
  injects <|output_start|>result<|output_end|>.
- search: the model writes <|search_start|>query<|search_end|>; the Engine asks the retriever
  (one batched call for all rows that searched this step) and injects the documents as
  <|doc_start|>[n] title\\ntext<|doc_end|> blocks, rendered by the same tokenizer code as training.

Injected tokens get mask 0 (the model did not choose them: never trained on in RL), are fed to the
model in one forward per block, and draw on their own budget, not on max_tokens. The model can
never sample a token that only tools may write (document and tool-output markers).
"""
import ast
import operator
from dataclasses import dataclass, field

import torch

from nanochat.gpt import InferenceCache
from nanochat.tokenizer import DEFAULT_MAX_DOC_TOKENS

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
    """logits (B, V) -> (B,) token ids. temperature 0 is greedy."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    if top_k is not None and top_k > 0:
        k = min(top_k, logits.size(-1))
        vals, idx = torch.topk(logits, k, dim=-1)
        probs = torch.softmax(vals / temperature, dim=-1)
        return idx.gather(1, torch.multinomial(probs, 1, generator=generator)).squeeze(1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@dataclass
class RowState:
    """One sample being generated: its tokens, and its completion as conversation parts."""
    tokens: list
    mask: list
    parts: list = field(default_factory=list)     # {"type": "text"|"python"|"python_output"|"search"|"search_results", ...}
    mode: str = "text"                            # what the sampled tokens currently belong to
    pending: list = field(default_factory=list)   # token ids of the part being written
    num_searches: int = 0
    num_docs_shown: int = 0
    injected_tokens: int = 0
    completed: bool = False


class Engine:
    def __init__(self, model, tokenizer, retriever=None, search_top_k=3, max_searches=4,
                 max_doc_tokens=DEFAULT_MAX_DOC_TOKENS, max_injected_tokens=2048):
        self.model, self.tokenizer, self.retriever = model, tokenizer, retriever
        self.search_top_k, self.max_searches = search_top_k, max_searches
        self.max_doc_tokens, self.max_injected_tokens = max_doc_tokens, max_injected_tokens
        S = tokenizer.special
        self.S = S
        self.banned = [S[t] for t in ("<|doc_start|>", "<|doc_end|>", "<|output_start|>", "<|output_end|>")]
        self.stop_tokens = {S["<|assistant_end|>"], S["<|bos|>"]}
        self.special_ids = set(S.values())

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
        if row.mode == "text":
            if tok == S["<|python_start|>"]:
                self._flush_text(row)
                row.mode = "python"
            elif tok == S["<|search_start|>"]:
                self._flush_text(row)
                row.mode = "search"
            elif tok not in self.special_ids:   # a stray control token is kept in the tokens, not in the text
                row.pending.append(tok)
            return None
        end = S["<|python_end|>"] if row.mode == "python" else S["<|search_end|>"]
        if tok != end:
            if tok not in self.special_ids:
                row.pending.append(tok)
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

    def _search_blocks(self, rows, searches):
        """Run all rows' searches in one retriever call; return {row_index: injected ids}."""
        blocks = {}
        todo = []
        for i, query in searches:
            row = rows[i]
            row.num_searches += 1
            if self.retriever is None or not query or row.num_searches > self.max_searches:
                # no retriever, empty query or over the hop cap: an empty result, so the model sees its search failed
                row.parts.append({"type": "search_results", "documents": []})
                continue
            todo.append((i, query))
        if todo:
            results = self.retriever.search_batch([q for _, q in todo], self.search_top_k)
            for (i, _), hits in zip(todo, results):
                row = rows[i]
                docs = [h.document.to_dict() for h in hits]
                ids = self.tokenizer.render_documents(docs, row.num_docs_shown + 1, self.max_doc_tokens)
                while docs and row.injected_tokens + len(ids) > self.max_injected_tokens:
                    docs = docs[:-1]   # over the injection budget: show fewer documents
                    ids = self.tokenizer.render_documents(docs, row.num_docs_shown + 1, self.max_doc_tokens)
                row.parts.append({"type": "search_results", "documents": docs})
                row.num_docs_shown += len(docs)
                if ids:
                    blocks[i] = ids
        return blocks

    @torch.no_grad()
    def generate(self, tokens, num_samples=1, max_tokens=256, temperature=1.0, top_k=None, seed=42):
        """
        Yields one step at a time: (new_tokens, new_masks, rows), where new_tokens[i] are the tokens
        row i gained this step (the sampled one, then any injected block) and new_masks[i] their
        masks (1 sampled, 0 injected). `rows` are the RowState objects (parts, counters).
        """
        assert isinstance(tokens, list) and tokens and isinstance(tokens[0], int), "expected a prompt of token ids"
        model = self.model
        device = model.lm_head.weight.device
        generator = torch.Generator(device=device).manual_seed(seed)
        max_len = len(tokens) + max_tokens + self.max_injected_tokens + 1
        cache = InferenceCache(model, 1, max_len, device)
        logits = model(torch.tensor([tokens], dtype=torch.long, device=device), cache=cache)[:, -1, :]
        if num_samples > 1:
            cache = cache.repeat_batch(num_samples)
            logits = logits.expand(num_samples, -1).contiguous()
        rows = [RowState(tokens=list(tokens), mask=[0] * len(tokens)) for _ in range(num_samples)]
        for _ in range(max_tokens):
            if all(r.completed for r in rows):
                break
            logits[:, self.banned] = float("-inf")
            logits[:, self.tokenizer.get_vocab_size():] = float("-inf")   # padding rows of the embedding are not tokens
            sampled = sample_next_token(logits, generator, temperature, top_k).tolist()
            new_tokens = [[] for _ in rows]
            new_masks = [[] for _ in rows]
            injections, searches = {}, []
            for i, row in enumerate(rows):
                if row.completed:
                    continue
                tok = sampled[i]
                row.tokens.append(tok)
                row.mask.append(1)
                new_tokens[i].append(tok)
                new_masks[i].append(1)
                action = self._consume(row, tok)
                if isinstance(action, tuple):
                    searches.append((i, action[1]))
                elif action and row.injected_tokens + len(action) <= self.max_injected_tokens:
                    injections[i] = action
            if searches:
                injections.update(self._search_blocks(rows, searches))
            # rows still running and with nothing to inject decode one token together ...
            plain = [i for i, r in enumerate(rows) if not r.completed and i not in injections]
            if plain:
                x = torch.tensor([[sampled[i]] for i in plain], dtype=torch.long, device=device)
                out = model(x, cache=cache, rows=plain)
                logits[plain] = out[:, -1, :]
            # ... rows with an injection feed the sampled token and the whole block in one forward
            for i, block in injections.items():
                row = rows[i]
                row.tokens += block
                row.mask += [0] * len(block)
                row.injected_tokens += len(block)
                new_tokens[i] += block
                new_masks[i] += [0] * len(block)
                x = torch.tensor([[sampled[i]] + block], dtype=torch.long, device=device)
                logits[i] = model(x, cache=cache, rows=[i])[0, -1, :]
            yield new_tokens, new_masks, rows
        for row in rows:   # a row cut off by max_tokens keeps what it wrote so far
            if row.mode == "text":
                self._flush_text(row)

    def generate_batch(self, tokens, num_samples=1, keep_stop=False, **kwargs):
        """Run generate to the end. Returns the RowStates: .tokens (prompt + completion; the stop
        token only with keep_stop, as RL wants: stopping is a choice too), .mask, .parts."""
        rows = None
        for _, _, rows in self.generate(tokens, num_samples, **kwargs):
            pass
        if rows is None:   # max_tokens == 0
            return [RowState(tokens=list(tokens), mask=[0] * len(tokens)) for _ in range(num_samples)]
        for row in rows:
            if not keep_stop and row.tokens[-1] in self.stop_tokens:
                row.tokens.pop()
                row.mask.pop()
        return rows
