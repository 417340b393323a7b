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
