"""
Benchmarks for the Mamba-2 mixer (nanochat/mamba.py). One function per table; each prints a
markdown table.

    python -m bench.bench_mamba                      # all tables, all cores
    python -m bench.bench_mamba --threads 1 --tables scan
    python -m bench.bench_mamba --tables kernels     # on a GPU with mamba_ssm installed

Tables:
  scan   chunked SSD scan vs the token-by-token recurrence, forward and forward+backward
         (the issue's targets: >= 5x forward, >= 10x forward+backward)
  mixer  the whole Mamba2Mixer (projections, conv, scan, gated norm) in tokens/s
  kernels  CUDA only: the mixer on mamba_ssm's kernels vs the reference path, same weights
Times are the minimum over repeats (the least disturbed run); on a shared machine expect +-30%.
"""
import argparse
import math
import os
import time

import torch
import torch.nn.functional as F

from nanochat.mamba import Mamba2Mixer, ssd_chunked_scan, ssd_sequential_scan


def best_time(fn, repeats=3, budget_s=30.0):
    """Minimum wall time of fn() over `repeats` runs after one warmup; fewer runs if they are slow."""
    t0 = time.perf_counter()
    fn()
    best = time.perf_counter() - t0
    spent = best
    for _ in range(repeats - 1):
        if spent + best > budget_s:
            break
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
    return best


def scan_inputs(batch, seqlen, nheads, headdim, d_state, ngroups=1, requires_grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seqlen, nheads, headdim, generator=gen)
    dt = F.softplus(torch.randn(batch, seqlen, nheads, generator=gen) - 3)
    A = -torch.empty(nheads).uniform_(1, 16, generator=gen)
    B = torch.randn(batch, seqlen, ngroups, d_state, generator=gen)
    C = torch.randn(batch, seqlen, ngroups, d_state, generator=gen)
    D = torch.ones(nheads)
    return [t.requires_grad_(requires_grad) for t in (x, dt, A, B, C, D)]


def fmt_ms(s):
    return "skipped" if s is None else f"{s * 1e3:.1f} ms"


def scan_table(lengths=(256, 1024, 4096), batch=4, nheads=8, headdim=32, d_state=64, chunk_size=64, seq_bwd_limit_s=20.0):
    """Chunked vs sequential scan (fp32, forward under no_grad, forward+backward through all inputs)."""
    print(f"\n### Scan: chunked (Q={chunk_size}) vs sequential, fp32, batch {batch}, {nheads} heads, "
          f"headdim {headdim}, d_state {d_state}, {torch.get_num_threads()} thread(s)\n")
    print("| L | seq fwd | chunked fwd | fwd speedup | seq fwd+bwd | chunked fwd+bwd | fwd+bwd speedup |")
    print("|---|---|---|---|---|---|---|")
    notes = []
    seq_bwd_times = []  # (L, seconds) of the sequential fwd+bwd so far, to predict the next one
    for L in lengths:
        x, dt, A, B, C, D = scan_inputs(batch, L, nheads, headdim, d_state)
        with torch.no_grad():
            seq_f = best_time(lambda: ssd_sequential_scan(x, dt, A, B, C, D))
            chk_f = best_time(lambda: ssd_chunked_scan(x, dt, A, B, C, chunk_size, D), repeats=5)
        inputs = scan_inputs(batch, L, nheads, headdim, d_state, requires_grad=True)

        def fwd_bwd(scan):
            y, final = scan(*inputs)
            (y.sum() + final.sum()).backward()
        chk_fb = best_time(lambda: fwd_bwd(lambda *a: ssd_chunked_scan(*a[:5], chunk_size, a[5])), repeats=5)
        # predict the sequential fwd+bwd from the previous lengths: at least linear in L, and it
        # grows faster than that in practice (thousands of small autograd nodes)
        predicted = None
        if seq_bwd_times:
            (L0, t0), (L1, t1) = seq_bwd_times[-2:] if len(seq_bwd_times) > 1 else (seq_bwd_times[-1],) * 2
            exponent = max(1.0, math.log(t1 / t0) / math.log(L1 / L0)) if L1 != L0 else 1.0
            predicted = t1 * (L / L1) ** exponent
        if predicted is not None and predicted > seq_bwd_limit_s:
            seq_fb = None
            notes.append(f"sequential fwd+bwd at L={L} skipped: predicted ~{predicted:.0f} s (> {seq_bwd_limit_s:.0f} s)")
        else:
            seq_fb = best_time(lambda: fwd_bwd(ssd_sequential_scan), repeats=2)
            seq_bwd_times.append((L, seq_fb))
        fb_speedup = "—" if seq_fb is None else f"{seq_fb / chk_fb:.1f}×"
        print(f"| {L} | {fmt_ms(seq_f)} | {fmt_ms(chk_f)} | {seq_f / chk_f:.1f}× | {fmt_ms(seq_fb)} | {fmt_ms(chk_fb)} | {fb_speedup} |", flush=True)
    for note in notes:
        print(f"\n{note}")


def mixer_table(configs=((128, 512, 16), (256, 512, 16), (128, 1024, 8)), d_state=64, headdim=32, chunk_size=64):
    """Whole Mamba2Mixer on the reference path, tokens/s (forward under no_grad, forward+backward)."""
    print(f"\n### Mamba2Mixer (reference path), fp32, d_state {d_state}, headdim {headdim}, chunk {chunk_size}, "
          f"{torch.get_num_threads()} thread(s)\n")
    print("| d_model | L | batch | fwd tok/s | fwd+bwd tok/s | fwd+bwd ms/step |")
    print("|---|---|---|---|---|---|")
    for d_model, L, batch in configs:
        torch.manual_seed(0)
        m = Mamba2Mixer(d_model, d_state=d_state, headdim=headdim, chunk_size=chunk_size)
        x = torch.randn(batch, L, d_model)
        with torch.no_grad():
            f = best_time(lambda: m(x), repeats=5)
        xg = x.clone().requires_grad_()

        def fwd_bwd():
            m(xg).square().mean().backward()
        fb = best_time(fwd_bwd, repeats=5)
        n = batch * L
        print(f"| {d_model} | {L} | {batch} | {n / f:,.0f} | {n / fb:,.0f} | {fb * 1e3:.0f} |", flush=True)


def kernel_table(configs=((768, 2048, 8), (1024, 4096, 4)), d_state=128, headdim=64, chunk_size=256):
    """The mixer on mamba_ssm's kernels vs the reference path, on the same weights and inputs.
    Speed under bf16 autocast (how training runs); max abs difference of the outputs in fp32."""
    import nanochat.mamba as mamba
    if not (torch.cuda.is_available() and mamba.HAVE_MAMBA_KERNELS):
        print("\n### Kernels: skipped (needs a CUDA device and mamba_ssm; see README, GPU install)")
        return
    print(f"\n### Mamba2Mixer on {torch.cuda.get_device_name()}: kernels vs reference, d_state {d_state}, "
          f"headdim {headdim}, chunk {chunk_size}\n")
    print("| d_model | L | batch | ref fwd tok/s | kernel fwd tok/s | ref fwd+bwd tok/s | kernel fwd+bwd tok/s "
          "| fwd+bwd speedup | max abs diff (fp32) |")
    print("|---|---|---|---|---|---|---|---|---|")

    def synced(fn):   # CUDA runs asynchronously: time until the work is done, not until it is queued
        def run():
            fn()
            torch.cuda.synchronize()
        return run
    forced = mamba.FORCE_REFERENCE
    try:
        for d_model, L, batch in configs:
            torch.manual_seed(0)
            m = Mamba2Mixer(d_model, d_state=d_state, headdim=headdim, chunk_size=chunk_size).cuda()
            x = torch.randn(batch, L, d_model, device="cuda")
            xg = x.clone().requires_grad_()

            def fwd():
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    m(x)

            def fwd_bwd():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    y = m(xg)
                y.float().square().mean().backward()
            times, outputs = {}, {}
            for path, force in (("reference", True), ("kernels", False)):
                mamba.FORCE_REFERENCE = force
                times[path] = (best_time(synced(fwd), repeats=10), best_time(synced(fwd_bwd), repeats=10))
                with torch.no_grad():
                    outputs[path] = m(x)
            n = batch * L
            (rf, rb), (kf, kb) = times["reference"], times["kernels"]
            diff = (outputs["reference"] - outputs["kernels"]).abs().max().item()
            print(f"| {d_model} | {L} | {batch} | {n / rf:,.0f} | {n / kf:,.0f} | {n / rb:,.0f} | {n / kb:,.0f} "
                  f"| {rb / kb:.1f}× | {diff:.1e} |", flush=True)
    finally:
        mamba.FORCE_REFERENCE = forced


TABLES = {"scan": scan_table, "mixer": mixer_table, "kernels": kernel_table}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--tables", default=",".join(TABLES), help=f"comma-separated subset of {list(TABLES)}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPU core(s)")
    for name in args.tables.split(","):
        TABLES[name]()
