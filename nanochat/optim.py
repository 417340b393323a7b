"""
Optimizers: Muon for the 2-D weight matrices inside blocks, AdamW for everything else.
Under torchrun, gradients are averaged across ranks before the step (all_reduce_grads), so every
rank takes the same step and the weights stay identical: simple, and works on gloo and nccl.
"""
import torch
import torch.distributed as dist


@torch.no_grad()
def zeropower_via_newtonschulz5(G, steps=5):
    """Approximately orthogonalise G (the nearest semi-orthogonal matrix) with a quintic
    Newton-Schulz iteration whose coefficients push singular values towards 1 quickly."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16() if G.is_cuda else G.float()   # bf16 is fast on GPU; on CPU fp32 is faster
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    # the products as one fused multiply-add each (addmm / baddbmm for a stack): B = b*A + c*A@A, X = a*X + B@X
    madd = torch.baddbmm if X.dim() == 3 else torch.addmm
    for _ in range(steps):
        A = X @ X.mT
        B = madd(A, A, A, beta=b, alpha=c)
        X = madd(X, B, X, beta=a)
    if transposed:
        X = X.mT
    return X.to(G.dtype)


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose update is orthogonalised per matrix."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            # matrices of one shape (a tall one as its transpose) are orthogonalised together in one
            # batched Newton-Schulz: a few large matmuls instead of dozens of small ones (on 2 CPU
            # cores a quarter of the optimizer's time at depth 4); each matrix's result is unchanged
            by_shape, updates = {}, {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                assert p.ndim == 2, f"Muon only takes 2-D matrices, got shape {tuple(p.shape)}"
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                g = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                # a fused projection (Mamba's in_proj: z | x | B | C | dt rows) is orthogonalised one
                # row block at a time, as if each were its own matrix
                parts = g.split(p._muon_splits) if hasattr(p, "_muon_splits") else [g]
                updates[p] = [None] * len(parts)
                for i, part in enumerate(parts):
                    tall = part.size(0) > part.size(1)
                    by_shape.setdefault(tuple(sorted(part.shape)), []).append((p, i, tall, part.mT if tall else part))
            for items in by_shape.values():
                X = zeropower_via_newtonschulz5(torch.stack([part for *_, part in items]), group["ns_steps"])
                for (p, i, tall, part), x in zip(items, X):
                    # tall matrices get a larger step: sqrt(rows / cols)
                    updates[p][i] = x.mT * (part.size(1) / part.size(0)) ** 0.5 if tall else x
            for p, parts in updates.items():
                p.add_(torch.cat(parts) if len(parts) > 1 else parts[0], alpha=-group["lr"])


def setup_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, other_lr=0.004,
                     weight_decay=0.0, betas=(0.8, 0.95)):
    """Returns [adamw, muon]. AdamW LRs for the embedding/head scale like nanochat's (∝ 1/sqrt(width/768));
    the non-matrix parameters (Mamba's conv/dt/A/D/norm) never get weight decay."""
    groups = model.param_groups()
    scale = (model.config.n_embd / 768) ** -0.5
    adam_groups = [
        dict(params=groups["embedding"], lr=embedding_lr * scale, weight_decay=weight_decay),
        dict(params=groups["unembedding"], lr=unembedding_lr * scale, weight_decay=weight_decay),
        dict(params=groups["other"], lr=other_lr, weight_decay=0.0),
    ]
    adam_groups = [g for g in adam_groups if g["params"]]   # tied embeddings: no separate embedding group
    # on CUDA one fused kernel updates every AdamW parameter; the CPU keeps the plain (for-loop) update
    fused = all(p.is_cuda for g in adam_groups for p in g["params"])
    adamw = torch.optim.AdamW(adam_groups, betas=betas, eps=1e-10, fused=fused)
    optimizers = [adamw]
    if groups["matrix"]:
        optimizers.append(Muon(groups["matrix"], lr=matrix_lr))
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def step_optimizers(optimizers, lr_multiplier):
    """One optimizer step at initial_lr * lr_multiplier for every group."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_multiplier
        opt.step()


def all_reduce_grads(model):
    """Average gradients across ranks in one flat buffer per dtype (few large messages)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    by_dtype = {}
    for p in model.parameters():
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
