"""
Pretraining batches. Rank r reads documents r, r+W, r+2W, ... (W = world size), each prefixed
with <|bos|>, concatenates them and cuts B*T+1 tokens per batch; the unused tail of the last
document is dropped so a batch depends only on where it starts. The loader's state is that
start (one integer per rank), which makes --resume-from-step exact.
"""
import torch


class PretrainLoader:
    def __init__(self, source, tokenizer, batch_size, seq_len, rank=0, world_size=1, device="cpu",
                 next_doc=None, docs_per_encode=64):
        self.source, self.tokenizer = source, tokenizer
        self.B, self.T = batch_size, seq_len
        self.rank, self.world = rank, world_size
        self.device = device
        self.next_doc = rank if next_doc is None else next_doc
        self.docs_per_encode = docs_per_encode
        self.bos = tokenizer.get_bos_token_id()
        self.avg_tokens = 256.0

    def state_dict(self):
        return {"next_doc": self.next_doc}

    def next_batch(self):
        need = self.B * self.T + 1
        buf = []
        while len(buf) < need:
            # encode a group sized from the running average so little encoding is thrown away
            group = max(1, min(self.docs_per_encode, int((need - len(buf)) / self.avg_tokens) + 1))
            idx = [self.next_doc + k * self.world for k in range(group)]
            encoded = self.tokenizer.encode([self.source.get(i) for i in idx], prepend=self.bos)
            for i, ids in zip(idx, encoded):
                self.avg_tokens = 0.9 * self.avg_tokens + 0.1 * len(ids)
                buf.extend(ids)
                self.next_doc = i + self.world   # documents after the one that fills the batch stay unread
                if len(buf) >= need:
                    break
        t = torch.tensor(buf[:need], dtype=torch.long)
        x = t[:-1].view(self.B, self.T).to(self.device, non_blocking=True)
        y = t[1:].view(self.B, self.T).to(self.device, non_blocking=True)
        return x, y

    def __iter__(self):
        while True:
            yield self.next_batch()


# -----------------------------------------------------------------------------
# Retrieval-augmented pretraining (In-Context RALM / REALM): each sequence is read after the
# documents a retriever finds for the text just before it

def flat_text(text):
    return " ".join(text.split())


def from_source(chunk, parent_text, source_text):
    """True when a retrieved chunk comes from the training document itself (compared by text, so
    any KB built from the same documents is recognised, whatever its ids or chunking)."""
    chunk_text, parent = flat_text(chunk.text), flat_text(parent_text)
    return bool(chunk_text) and (chunk_text in source_text or parent in source_text or source_text in parent)


class NeighbourLoader:
    """Pretraining rows of units
        <|bos|> [neighbour document blocks] [query tokens] [sequence tokens]
    with targets on the sequence's tokens only. A document is cut into an opening (its first line,
    at most query_tokens tokens: context, never scored) and sequences of at most seq_tokens tokens.
    A sequence's query is the text just before it (the opening, then the last query_tokens tokens of
    the previous sequence), so nothing that is scored chose its neighbours. Neighbours: the
    retriever's best k chunks for the query that do not come from the document itself, each cut to
    neighbour_tokens. k = 0 gives the same units without neighbours (the comparison). Units are
    packed whole into rows of T + 1 tokens; seq_idx keeps attention and Mamba state inside a unit.
    retriever: search_batch(queries, n) -> per query a list of results with .document (a chunk,
    .doc_id naming its parent); parent_text: doc_id -> the parent document's text.
    With units_only, next_units() hands out the units instead (REALM's marginal objective builds
    its own rows)."""

    def __init__(self, source, tokenizer, retriever, parent_text, k, batch_size, seq_len, rank=0, world_size=1,
                 device="cpu", next_doc=None, seq_tokens=None, query_tokens=None, neighbour_tokens=None, docs_per_fetch=32):
        self.source, self.tokenizer, self.retriever, self.parent_text = source, tokenizer, retriever, parent_text
        self.k, self.B, self.T = k, batch_size, seq_len
        self.rank, self.world, self.device = rank, world_size, device
        self.next_doc = rank if next_doc is None else next_doc
        self.seq_tokens = seq_tokens or seq_len // 2
        self.query_tokens = query_tokens or min(32, seq_len // 8)
        if self.seq_tokens + self.query_tokens + 1 > seq_len + 1:
            raise ValueError(f"a sequence of {self.seq_tokens} tokens and its query of {self.query_tokens} do not fit in {seq_len}")
        # the neighbours share what the sequence and its query leave of a row
        self.neighbour_tokens = neighbour_tokens or max(16, (seq_len - self.seq_tokens - self.query_tokens - 1) // max(k, 1) - 2)
        self.docs_per_fetch = docs_per_fetch
        self.bos = tokenizer.get_bos_token_id()
        self.units = []   # (doc index, query text, context ids, sequence ids, neighbours)

    def state_dict(self):
        # a resumed run starts again at the document of the next unit (its earlier units repeat)
        return {"next_doc": self.units[0][0] if self.units else self.next_doc}

    def _cut(self, text):
        """(query text, query ids, sequence ids) for each sequence of a document."""
        first, newline, rest = text.partition("\n")
        head = self.tokenizer.encode(first + newline)
        opening = head[:self.query_tokens]   # a long first line: the query is its first tokens, the rest is scored
        body = head[self.query_tokens:] + (self.tokenizer.encode(rest) if rest else [])
        out, query = [], opening
        for start in range(0, len(body), self.seq_tokens):
            seq = body[start:start + self.seq_tokens]
            out.append((self.tokenizer.decode(query), query, seq))
            query = seq[-self.query_tokens:]
        return out

    def _fetch(self):
        docs = [self.next_doc + j * self.world for j in range(self.docs_per_fetch)]
        self.next_doc = docs[-1] + self.world
        cut = [(i, text, piece) for i in docs for text in [self.source.get(i)] for piece in self._cut(text)]
        results = self.retriever.search_batch([q for _, _, (q, _, _) in cut], self.k + 8) if self.k else [[] for _ in cut]
        for (i, text, (query, query_ids, seq)), found in zip(cut, results):
            source_text = flat_text(text)
            keep = [r.document for r in found
                    if not from_source(r.document, self.parent_text.get(r.document.doc_id, ""), source_text)]
            self.units.append((i, query, [self.bos] + query_ids, seq, keep[:self.k]))

    def next_units(self, n):
        while len(self.units) < n:
            self._fetch()
        out, self.units = self.units[:n], self.units[n:]
        return out

    def render(self, unit, neighbours=None):
        """(ids, scored mask) of one unit; neighbours: the chunks to show (default: the unit's own).
        A unit always fits a row: whole neighbour blocks are left out first."""
        _, _, context, seq, found = unit
        blocks, room = [], self.T + 1 - len(context) - len(seq)
        for j, d in enumerate(found if neighbours is None else neighbours):
            block = self.tokenizer.render_documents([{"title": d.title, "text": d.text}], first_number=j + 1,
                                                    max_doc_tokens=self.neighbour_tokens)
            if len(blocks) + len(block) > room:
                break
            blocks += block
        ids = context[:1] + blocks + context[1:] + seq
        return ids, [0] * (len(ids) - len(seq)) + [1] * len(seq)

    def next_batch(self):
        rows = []
        for _ in range(self.B):
            ids, scored, seq_idx = [], [], []
            while True:
                if not self.units:
                    self._fetch()
                unit_ids, unit_scored = self.render(self.units[0])
                if ids and len(ids) + len(unit_ids) > self.T + 1:
                    break
                self.units.pop(0)
                seq_idx += [seq_idx[-1] + 1 if seq_idx else 0] * len(unit_ids)
                ids, scored = ids + unit_ids, scored + unit_scored
            pad = self.T + 1 - len(ids)
            seq_idx += [(seq_idx[-1] + 1) if seq_idx else 0] * pad
            rows.append((ids + [self.bos] * pad, scored + [0] * pad, seq_idx))
        ids = torch.tensor([r[0] for r in rows])
        scored = torch.tensor([r[1] for r in rows], dtype=torch.bool)
        x = ids[:, :-1]
        y = torch.where(scored[:, 1:], ids[:, 1:], torch.full_like(x, -1))
        seq_idx = torch.tensor([r[2][:-1] for r in rows])
        return x.to(self.device), y.to(self.device), seq_idx.to(self.device)

    def __iter__(self):
        while True:
            yield self.next_batch()
