#!/usr/bin/env python3
"""TopK SAE training throughput: eleuther-interp (`sae train --activations`) vs PyPI
eai-sparsify's training step, side by side in one run, on the same activations and the same
recipe (FVU loss, Adam at sparsify's default lr 2e-4 / sqrt(n / 2^14), linear warm-up then
decay, b_dec initialised to the first batch's mean, decoder rows kept at unit norm).

The activations are those of `layers.0` of a synthetic model of the chosen shape (d = 768 for
pythia-160m) over WikiText-2, cached once with `hooks cache`. The peer is sparsify's own
`SparseCoder` forward/backward (its fused TopK encoder autograd function, triton off: this
is a CPU run) plus the steps of `sparsify/trainer.py` around it, driven by a small loop
here because sparsify's trainer needs `datasets`, `schedulefree` and a model; sparsify's
package `__init__` is bypassed as in tests/fixtures/generate.py.

Run with the reference venv (torch + eai-sparsify):

    /work/venv-ref/bin/python bench/sae_train.py [--shape pythia-160m] [--latents 24576] [--k 32]
        [--steps 5] [--batch 4096] [--threads 2]

`--device cuda` trains both on the GPU (sparsify with its Triton kernels under its bf16
autocast; ours with the encoder product in bf16 unless `--encoder-dtype f32`; both
synchronise before the clock stops) and prints each side's share of the FLOP floor: per
token, the dense encoder product 2 d n (its backward touches only the k selected columns)
plus about 10 d k for the sparse decode and the sparse gradients, at `--peak-tflops`
(default 989: H100/H200 dense bf16). `--prebuilt DIR` takes our binaries (sae, hooks,
forward_bench) from DIR instead of building them (bench/gpu.sh carries them to the GPU).

`--optimizer muon` runs sparsify's Muon recipe on both sides instead (trainer.py's `muon`
branch: `sparsify.muon.Muon` on the weight matrices with a linear schedule and no warm-up,
Adam on the biases with the warm-up, both at 2e-3), where each step also pays two bf16
Newton-Schulz orthogonalisations of `[n, d]` matrices (5 iterations of 4 d^2 n FLOP each).

Both sides are timed over the steps after the first (`--steps` at least 2): the first pays
one-time costs (CUDA kernels compiled by NVRTC or Triton, cuBLAS set up) that would swamp a
short run on a GPU; ours reports that rate as `after the first step: ...`.
"""
import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from forward import SHAPES, bench_model, config_for, our_binaries  # noqa: E402


def import_sparsify(device="cpu"):
    import importlib.metadata
    import importlib.util
    import types

    if device == "cpu":
        os.environ["SPARSIFY_DISABLE_TRITON"] = "1"
    if "sparsify" not in sys.modules:
        spec = importlib.util.find_spec("sparsify")
        if spec is None:
            raise SystemExit("eai-sparsify is not installed in this Python (use /work/venv-ref/bin/python)")
        pkg = types.ModuleType("sparsify")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["sparsify"] = pkg
    from sparsify.config import SparseCoderConfig
    from sparsify.sparse_coder import SparseCoder

    return SparseCoder, SparseCoderConfig, importlib.metadata.version("eai-sparsify")


def load_cache(cache: Path, point: str) -> np.ndarray:
    """Every row of the cache at `point`, in dataset order, straight from the shard files."""
    from safetensors.numpy import load_file

    manifest = json.loads((cache / "manifest.json").read_text())
    return np.concatenate([load_file(str(cache / s["file"]))[point] for s in manifest["shards"]])


def peer(args):
    import torch

    SparseCoder, SparseCoderConfig, version = import_sparsify(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    acts = load_cache(Path(args.cache), "layers.0")
    d = acts.shape[1]
    sae = SparseCoder(d, SparseCoderConfig(num_latents=args.latents, k=args.k), device=args.device)

    def schedule(warmup):  # transformers' get_linear_schedule_with_warmup
        def factor(step):
            if step < warmup:
                return step / max(1, warmup)
            return max(0.0, (args.steps - step) / max(1, args.steps - warmup))
        return factor

    if args.optimizer == "muon":  # trainer.py's muon branch
        from sparsify.muon import Muon

        matrices = [p for p in sae.parameters() if p.ndim >= 2]
        vectors = [p for p in sae.parameters() if p.ndim < 2]
        opts = [Muon(matrices, lr=2e-3, ddp=False), torch.optim.Adam(vectors, lr=2e-3)]
        scheds = [torch.optim.lr_scheduler.LambdaLR(opts[0], schedule(0)),
                  torch.optim.lr_scheduler.LambdaLR(opts[1], schedule(args.warmup))]
    else:
        opts = [torch.optim.Adam(sae.parameters(), lr=2e-4 / (args.latents / 2**14) ** 0.5)]
        scheds = [torch.optim.lr_scheduler.LambdaLR(opts[0], schedule(args.warmup))]
    fvus = []
    for step in range(args.steps):
        x = torch.from_numpy(acts[step * args.batch:(step + 1) * args.batch]).to(args.device)
        if step == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        for opt in opts:
            opt.step()
            opt.zero_grad()
        for sched in scheds:
            sched.step()
        sae.set_decoder_norm_to_unit_norm()
        fvus.append(out.fvu.item())
        if step == 0:  # as ours: the clock starts once the first step (Triton's compiles) is done
            if args.device != "cpu":
                torch.cuda.synchronize()
            start = time.perf_counter()
    if args.device != "cpu":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(json.dumps({"impl": f"eai-sparsify {version} (torch {torch.__version__})", "seconds": seconds,
                      "tokens_per_s": (args.steps - 1) * args.batch / seconds, "fvu_last_step": fvus[-1],
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="pythia-160m", choices=sorted(SHAPES))
    p.add_argument("--latents", type=int, default=24576)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=4096, help="tokens per step")
    p.add_argument("--chunk-tokens", type=int, help="our `sae train --chunk-tokens` (default: the whole step)")
    p.add_argument("--warmup", type=int, default=1000, help="lr warm-up steps (sparsify: 1000)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--encoder-dtype", default="auto", choices=["auto", "bf16", "f32"],
                   help="our `sae train --encoder-dtype` (auto: bf16 on a GPU, as sparsify's autocast)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--optimizer", default="adam", choices=["adam", "muon"], help="both sides' optimiser recipe")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the device's peak, for the floor (GPU only)")
    p.add_argument("--prebuilt", help="a folder with our sae, hooks and forward_bench binaries (skips cargo build)")
    p.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps < 2:
        p.error("--steps must be at least 2: both sides are timed over the steps after the first")
    if args.peer:
        return peer(args)

    binaries = our_binaries(args.prebuilt, "sae")
    bench = REPO / "target" / "bench"
    model_path = bench_model(args.shape, binaries)

    needed = args.steps * args.batch
    cache = bench / f"sae-acts-{args.shape}-{needed}"
    if not (cache / "manifest.json").exists():
        subprocess.run([str(binaries["hooks"]), "cache", "--model", str(model_path), "--hookpoints",
                        "layers.0", "--data", str(REPO / "data/wikitext-2-raw-test.txt"), "--seq-len", "256", "--device", args.device,
                        "--max-tokens", str(needed), "--output", str(cache), "--overwrite"], check=True,
                       capture_output=True)

    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    out = bench / f"sae-{args.shape}"
    cmd = [str(binaries["sae"]), "train", "--activations", str(cache), "--output", str(out), "--device", args.device,
           "--batch-size", str(args.batch), "--steps", str(args.steps), "--k", str(args.k),
           "--num-latents", str(args.latents), "--lr-warmup-steps", str(args.warmup),
           "--checkpoint-every", "0", "--chunk-tokens", str(args.chunk_tokens or args.batch), "--seed", str(args.seed),
           "--encoder-dtype", args.encoder_dtype, "--optimizer", args.optimizer]
    subprocess.run(["rm", "-rf", str(out)], check=True)
    ours = subprocess.run(["/usr/bin/time", "-f", "%M"] + cmd, env=env, capture_output=True, text=True)
    if ours.returncode != 0:
        sys.exit(ours.stdout + ours.stderr)
    ours_peak = int(ours.stderr.strip().splitlines()[-1]) / 1024
    m = re.search(r"after the first step: (\d+) steps in ([\d.]+) s \((\d+) tokens/s\)", ours.stdout)
    ours_s, ours_tps = float(m.group(2)), float(m.group(3))
    history = json.loads((out / "checkpoints" / "layers.0" / "history.json").read_text())

    theirs = subprocess.run([sys.executable, __file__, "--peer", "--cache", str(cache), "--steps", str(args.steps),
                             "--batch", str(args.batch), "--latents", str(args.latents), "--k", str(args.k),
                             "--warmup", str(args.warmup), "--threads", str(args.threads), "--seed", str(args.seed),
                             "--device", args.device, "--optimizer", args.optimizer],
                            env=env, capture_output=True, text=True)
    if theirs.returncode != 0:
        sys.exit(theirs.stderr)
    t = json.loads(theirs.stdout.strip().splitlines()[-1])
    d = config_for(args.shape)["hidden_size"]
    print(f"TopK SAE training ({args.optimizer}), d {d}, {args.latents} latents, k {args.k}, "
          f"{args.steps} steps x {args.batch} tokens, {args.threads} threads")
    encoder = {"auto": "bf16" if args.device != "cpu" else "f32"}.get(args.encoder_dtype, args.encoder_dtype)
    print(f"  eleuther-interp ({encoder} encoder product): {ours_tps:8.1f} tokens/s  ({ours_s:.1f} s, steps after the first, incl. cache reads)  "
          f"peak RSS {ours_peak:.0f} MiB  FVU last step {history[-1]['fvu']:.4f}")
    print(f"  {t['impl']}: {t['tokens_per_s']:8.1f} tokens/s  ({t['seconds']:.1f} s, steps after the first)  "
          f"peak RSS {t['peak_rss_mib']:.0f} MiB  FVU last step {t['fvu_last_step']:.4f}")
    print(f"  ratio ours/theirs (throughput): {ours_tps / t['tokens_per_s']:.2f}")
    if args.device != "cpu":
        flops = 2 * d * args.latents + 10 * d * args.k  # dense encoder forward + the sparse products
        for name, tps in [("eleuther-interp", ours_tps), ("eai-sparsify", t["tokens_per_s"])]:
            print(f"  {name}: {flops * tps / 1e12:.1f} TFLOP/s = {100 * flops * tps / (args.peak_tflops * 1e12):.1f}% "
                  f"of {args.peak_tflops:.0f} TFLOP/s (floor: {flops / 1e6:.1f} MFLOP per token)")


if __name__ == "__main__":
    main()
