"""Validation loss in bits per byte: independent of the tokenizer's vocabulary, so runs with
different tokenizers compare."""
import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """Sum of nats over target tokens / (ln 2 * their byte count). Special tokens (0 bytes) and
    ignored targets (-1) are left out. Summed over ranks under torchrun."""
    total_nats = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    total_bytes = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    for _ in range(steps):
        x, y, *seq_idx = next(batches)   # packed units bring seq_idx
        loss = model(x, y, seq_idx=seq_idx[0] if seq_idx else None, loss_reduction="none").view(-1)
        y = y.view(-1)
        valid = y >= 0
        nbytes = torch.where(valid, token_bytes[y.clamp(min=0)], torch.zeros_like(y))
        counted = nbytes > 0
        total_nats += (loss * counted).sum().double()
        total_bytes += nbytes.sum().double()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    if total_bytes.item() == 0:
        return float("inf")
    return (total_nats / (math.log(2) * total_bytes)).item()
