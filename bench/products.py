#!/usr/bin/env python3
"""Matrix-product throughput on the CPU: our bf16 product (`hooks::cpu::bf16::gemm`, bf16 inputs,
f32 sums) and our f32 products (the `gemm` crate's, and ours with the weight packed once, which
f32 layers and the unembedding take on CPUs with AVX-512), against PyTorch's
`torch.nn.functional.linear` in bf16 and f32, side by side in one run on the same shapes (a
forward pass's products by default: Pythia-160m's QKV, MLP up, MLP down and unembedding over
2048 tokens and over 64). Says which dtype is faster on this
CPU for each side: where bf16 loses to f32 (Intel CPUs whose AMX is absent or hidden), a bf16
model's layers and logits, Muon's Newton-Schulz products and the lens's `--decode-dtype auto`
take f32 products (`Kernel::beats_f32`). Both sides take the right-hand matrix stored
`[N, K]`, as a linear layer's weight is.

    python bench/products.py [--shapes 2048x768x2304 ...] [--threads 2] [--reps 5] [--kernel auto]

Needs a Python with torch (not needed by CI).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHAPES = [f"{m}x{kn}" for m in (2048, 64) for kn in ("768x2304", "768x3072", "3072x768", "768x50304")]


def ours(args):
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "eleuther-hooks", "--example", "products_bench"],
                   cwd=REPO, check=True)
    binary = REPO / "target" / "release" / "examples" / "products_bench"
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    out = subprocess.run([str(binary), *args.shapes, "--reps", str(args.reps), "--kernel", args.kernel],
                         env=env, check=True, capture_output=True, text=True).stdout
    return {row["shape"]: row for row in map(json.loads, out.splitlines())}


def theirs(args):
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(args.threads)
    rows = {}
    for shape in args.shapes:
        m, k, n = map(int, shape.split("x"))
        flop = 2.0 * m * k * n
        rate = {}
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(m, k).to(dtype)
            w = torch.randn(n, k).to(dtype)
            with torch.inference_mode():
                F.linear(x, w)
                best = float("inf")
                for _ in range(args.reps):
                    start = time.perf_counter()
                    F.linear(x, w)
                    best = min(best, time.perf_counter() - start)
            rate[dtype] = flop / best / 1e9
        rows[shape] = {"bf16_gflops": rate[torch.bfloat16], "f32_gflops": rate[torch.float32]}
    return rows, torch.__version__


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=SHAPES, help="MxKxN: [M, K] times [K, N]")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--reps", type=int, default=5, help="timed calls per product; the best counts")
    p.add_argument("--kernel", default="auto", choices=["auto", "amx", "avx512bf16", "portable"],
                   help="our bf16 kernel")
    args = p.parse_args()
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit("torch is not installed in this Python (use the reference venv of tests/fixtures/README.md)")
    our_rows = ours(args)
    their_rows, version = theirs(args)
    kernel = next(iter(our_rows.values()))
    packed_used = kernel["packed_f32_kernel"] == "Avx512"
    print(f"products on the CPU, {args.threads} threads, best of {args.reps}; our bf16 kernel {kernel['kernel']} "
          f"(beats f32 here: {kernel['beats_f32']}); our packed f32 kernel {kernel['packed_f32_kernel']} "
          f"(taken by f32 layers here: {packed_used}); torch {version}")
    print(f"{'shape':>16} {'ours bf16':>10} {'ours f32':>10} {'f32 packed':>10} {'torch bf16':>11} {'torch f32':>10} "
          f"{'ratio bf16':>11} {'ratio f32':>10}   GFLOP/s; ratio f32: the product our f32 layers take")
    for shape in args.shapes:
        o, t = our_rows[shape], their_rows[shape]
        ours_f32 = o["packed_f32_gflops"] if packed_used else o["f32_gflops"]
        print(f"{shape:>16} {o['bf16_gflops']:10.1f} {o['f32_gflops']:10.1f} {o['packed_f32_gflops']:10.1f} "
              f"{t['bf16_gflops']:11.1f} {t['f32_gflops']:10.1f} {o['bf16_gflops'] / t['bf16_gflops']:11.2f} "
              f"{ours_f32 / t['f32_gflops']:10.2f}")
        for gap in ("relative_checksum_gap", "packed_f32_relative_checksum_gap"):
            if o[gap] > 1e-3:
                sys.exit(f"our products disagree on {shape}: {gap} {o[gap]:.2e}")


if __name__ == "__main__":
    main()
