#!/usr/bin/env python3
"""Python binding overhead: `Model.run_with_cache` from Python on a synthetic
Pythia-160m-shaped model (12 layers, hidden 768, 12 heads, vocab 50304), 4 x 512 tokens,
capturing every `layers.{i}`: the same work as bench/forward_bench.rs does in Rust (same
model folder, same token ids), plus variants that show where Python time goes.

Needs the package built in release mode into the test virtualenv:

    python/run-tests --release                           # once (builds + installs, runs tests)
    target/py-venv/bin/python bench/python_overhead.py [--batch 4] [--seq 512] [--iters 3] [--rust]

`--rust` also builds and runs bench/forward_bench.rs (cargo, release) in a child process and
prints the ratio. Threads: candle uses all cores unless RAYON_NUM_THREADS is set.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import eleuther_interp as ei
from eleuther_interp import _native

REPO = Path(__file__).resolve().parent.parent

CONFIG = {
    "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox",
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "hidden_act": "gelu", "rotary_pct": 0.25,
    "rotary_emb_base": 10000, "max_position_embeddings": 2048, "layer_norm_eps": 1e-5,
    "use_parallel_residual": True, "tie_word_embeddings": False, "vocab_size": 50304,
    "bos_token_id": 0, "eos_token_id": 0,
}


def token_ids(batch, seq, vocab):
    # Same formula as bench/forward_bench.rs and bench/forward.py.
    i = np.arange(batch * seq, dtype=np.uint64)
    ids = (i * np.uint64(2654435761) + np.uint64(12345)) % np.uint64(min(vocab, 50000))
    return ids.astype(np.int64).reshape(batch, seq)


def timed(fn, iters):
    fn()  # warm-up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rust", action="store_true", help="also run bench/forward_bench.rs for comparison")
    p.add_argument("--variants", action="store_true", help="also time forward-only, stop_early and hook variants")
    args = p.parse_args()
    if getattr(_native, "DEBUG_BUILD", False):
        print("warning: eleuther_interp is a debug build; run `python/run-tests --release` first", file=sys.stderr)

    model_dir = REPO / "target" / "bench" / "pythia-160m-synthetic"
    if not (model_dir / "model.safetensors").exists():
        print(f"writing synthetic weights to {model_dir} ...", file=sys.stderr)
        ei.make_synthetic_model(model_dir, CONFIG)
    model = ei.Model.from_pretrained(model_dir, dtype=args.dtype)
    ids = token_ids(args.batch, args.seq, model.config["vocab_size"])
    tokens = ids.size
    layers = [f"layers.{i}" for i in range(model.config["num_layers"])]

    def report(name, seconds):
        print(f"  {name:<44} {tokens / seconds:9.1f} tokens/s  (median {seconds:.3f} s)")
        return seconds

    threads = os.environ.get("RAYON_NUM_THREADS", str(os.cpu_count()))
    print(f"python run_with_cache, pythia-160m shape (synthetic), batch {args.batch} x {args.seq}, "
          f"{args.dtype}, {threads} threads, {args.iters} iterations (median)")
    report("run_with_cache(ids, layers.*) [= forward_bench]",
                    timed(lambda: model.run_with_cache(ids, layers), args.iters))
    if args.variants:
        report("forward(ids) (logits only)", timed(lambda: model.forward(ids), args.iters))
        report("run_with_cache(ids, layers.*, stop_early)",
               timed(lambda: model.run_with_cache(ids, layers, stop_early=True), args.iters))
        report("run_with_hooks(ids, identity callable x12)",
               timed(lambda: model.run_with_hooks(ids, {name: (lambda x: x) for name in layers}), args.iters))
    if args.rust:
        # Alternate Python and Rust runs so that both see the same machine load; each Rust
        # child loads the model, warms up and times one pass.
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "eleuther-hooks", "--example", "forward_bench"],
                       cwd=REPO, check=True)
        rust_cmd = [str(REPO / "target/release/examples/forward_bench"), str(model_dir), "--batch", str(args.batch),
                    "--seq", str(args.seq), "--iters", "1", "--dtype", args.dtype]
        py_times, rust_times = [], []
        for _ in range(args.iters):
            start = time.perf_counter()
            model.run_with_cache(ids, layers)
            py_times.append(time.perf_counter() - start)
            out = subprocess.run(rust_cmd, check=True, capture_output=True, text=True)
            rust_times.append(json.loads(out.stdout.strip().splitlines()[-1])["median_s"])
        py_s = sorted(py_times)[len(py_times) // 2]
        rust_s = sorted(rust_times)[len(rust_times) // 2]
        print("interleaved with the Rust bench:")
        report("python run_with_cache(ids, layers.*)", py_s)
        report("rust forward_bench (same work)", rust_s)
        print(f"  python overhead: {100 * (py_s / rust_s - 1):+.1f}% "
              f"(python runs {', '.join(f'{t:.2f}' for t in py_times)} s; "
              f"rust runs {', '.join(f'{t:.2f}' for t in rust_times)} s)")

if __name__ == "__main__":
    main()
