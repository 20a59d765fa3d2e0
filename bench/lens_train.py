#!/usr/bin/env python3
"""Tuned-lens training throughput: eleuther-interp (`lens train`) vs PyPI tuned-lens, side by
side in one run, on the same model, the same text and the same recipe (SGD Nesterov 0.9,
lr 1.0 in tuned-lens's convention, weight decay 1e-3, clip 1.0, KL loss, linear decay).

The peer is tuned-lens's own training step (`tuned_lens/scripts/train_loop.py`: model forward
with output_hidden_states under no_grad, per-layer KL backward under bfloat16 autocast,
clip, step), driven by a small loop here because its CLI needs the datasets library and
the hub. Both read the same token chunks: the text is tokenized by our `hooks` data
pipeline (EOS-joined, packed) and written to an .npy file that both sides consume.

    python bench/lens_train.py [--shape pythia-160m|smollm2] [--steps 3] [--tokens-per-step 512] [--seq 256]
                               [--decode-dtype auto|bf16|f32]

`--device cuda` trains both on the GPU (tuned-lens under CUDA bfloat16 autocast; both
synchronise before the clock stops) and prints each side's share of the FLOP floor: per
token, the model's forward (2 N + 2 L T d, as bench/forward.py) plus, for each of the L
lenses, the translator and its weight gradient (4 d^2) and the two vocabulary-sized
products (4 d V), at `--peak-tflops` (default 989: H100/H200 dense bf16). `--prebuilt DIR`
takes our binaries (lens, hooks, forward_bench) from DIR instead of building them.

Both sides are timed over the steps after the first (`--steps` at least 2): the first pays
one-time costs (CUDA kernels compiled by NVRTC or Triton, cuBLAS set up) that would swamp a
short run on a GPU; ours reports that rate as `after the first step: ...`.
"""
import argparse
import importlib.metadata
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
from forward import (SHAPES, bench_model, child, config_for, forward_flops_per_token,  # noqa: E402
                     our_binaries, peer_model, wikitext_tokens)


def peer(args):
    import torch
    from tuned_lens.nn.lenses import TunedLens

    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    model = peer_model(args.model_path, args.device)
    lens = TunedLens.from_model(model).float().to(args.device)
    opt = torch.optim.SGD(lens.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (args.steps - s) / args.steps))
    tokens = np.load(args.tokens).astype(np.int64)
    per_step = args.tokens_per_step // args.seq
    micro = args.batch
    autocast = {"bf16": torch.bfloat16, "f32": None}[args.peer_precision]
    losses = []
    cpu_start = resource.getrusage(resource.RUSAGE_SELF)
    row = 0
    for step in range(args.steps):
        step_losses = []
        for _ in range(per_step // micro):
            ids = torch.from_numpy(tokens[row:row + micro]).to(args.device)
            row += micro
            with torch.no_grad():
                out = model(ids, output_hidden_states=True)
            labels = out.logits.float().log_softmax(-1)
            for i, h in enumerate(out.hidden_states[:-1]):
                with torch.autocast("cuda" if cuda else "cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
                    logits = lens(h, idx=i)
                    loss = torch.sum(labels.exp() * (labels - logits.log_softmax(-1)), dim=-1).mean()
                    step_losses.append(loss.detach())  # no .item() here: it would stall a GPU
                (loss / (per_step // micro)).backward()
        torch.nn.utils.clip_grad_norm_(lens.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        sched.step()
        losses.append(torch.stack(step_losses).mean())
        if step == 0:  # as ours: the clock starts once the first step is done
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    cpu_end = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu_end.ru_utime - cpu_start.ru_utime) + (cpu_end.ru_stime - cpu_start.ru_stime)
    print(json.dumps({"cpu_seconds": cpu, "impl": f"tuned-lens {importlib.metadata.version('tuned-lens')} ({args.peer_precision} autocast)",
                      "seconds": seconds, "tokens_per_s": (args.steps - 1) * args.tokens_per_step / seconds,
                      "mean_loss_last_step": losses[-1].item(),
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "device_mem_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else 0}))


def lens_training_flops_per_token(config, seq):
    """The model's forward plus, per lens, 4 d^2 (translator, its weight gradient) and 4 d V
    (the lens logits and the gradient back through the unembedding)."""
    d, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    return forward_flops_per_token(config, seq) + layers * (4 * d * d + 4 * d * vocab)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="pythia-160m", choices=sorted(SHAPES) + ["smollm2"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--tokens-per-step", type=int, default=512)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--peer-precision", default="bf16", choices=["bf16", "f32"],
                   help="tuned-lens trains under bfloat16 autocast by default")
    p.add_argument("--decode-dtype", default="auto", choices=["auto", "bf16", "f32"],
                   help="our `lens train --decode-dtype` (auto: bf16 where bf16 products beat f32: AMX, AMD's AVX-512 BF16)")
    p.add_argument("--chunk-tokens", type=int, default=512, help="our `lens train --chunk-tokens`")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the device's peak, for the floor (GPU only)")
    p.add_argument("--prebuilt", help="a folder with our lens, hooks and forward_bench binaries (skips cargo build)")
    p.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-path", help=argparse.SUPPRESS)
    p.add_argument("--tokens", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps < 2:
        p.error("--steps must be at least 2: both sides are timed over the steps after the first")
    if args.peer:
        return peer(args)

    binaries = our_binaries(args.prebuilt, "lens")
    bench = REPO / "target" / "bench"
    model_path = str(bench_model(args.shape, binaries))

    # The same chunks for both: tokenized once by our pipeline (`hooks tokenize`) into an .npy.
    needed = args.steps * args.tokens_per_step
    npy = bench / f"lens-tokens-{args.shape}-{args.seq}.npy"
    wikitext_tokens(binaries, model_path, npy, args.seq, needed)

    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    out = bench / f"lens-{args.shape}"
    cmd = [str(binaries["lens"]), "train", "--model", model_path, "--data", str(npy),
           "--seq-len", str(args.seq), "--batch-size", str(args.batch), "--tokens-per-step", str(args.tokens_per_step),
           "--steps", str(args.steps), "--checkpoint-every", "0", "--output", str(out),
           "--decode-dtype", args.decode_dtype, "--device", args.device,
           "--chunk-tokens", str(args.chunk_tokens),
           "--shuffle-sequences", "1"]  # in the file's order, as the peer reads it
    subprocess.run(["rm", "-rf", str(out)], check=True)
    ours = subprocess.run(["/usr/bin/time", "-f", "%M %U %S"] + cmd, env=env, capture_output=True, text=True)
    if ours.returncode != 0:
        sys.exit(ours.stderr)
    m = re.search(r"after the first step: (\d+) steps in ([\d.]+) s \((\d+) tokens/s\)", ours.stdout)
    ours_s, ours_tps = float(m.group(2)), float(m.group(3))
    peak_kib, user_s, sys_s = ours.stderr.strip().splitlines()[-1].split()
    ours_peak, ours_cpu = int(peak_kib) / 1024, float(user_s) + float(sys_s)
    decoded = "bf16" if "decoding lenses in bf16" in ours.stderr else "f32"
    history = json.loads((out / "training" / "history.json").read_text())
    ours_loss = sum(history[-1]["loss"]) / len(history[-1]["loss"])

    t = child([sys.executable, __file__, "--peer", "--model-path", model_path, "--tokens", str(npy),
               "--steps", str(args.steps), "--tokens-per-step", str(args.tokens_per_step),
               "--seq", str(args.seq), "--batch", str(args.batch), "--threads", str(args.threads),
               "--peer-precision", args.peer_precision, "--device", args.device], env)
    print(f"tuned-lens training, {args.shape}, {args.steps} steps x {args.tokens_per_step} tokens (seq {args.seq}), "
          f"{args.device if args.device != 'cpu' else f'{args.threads} threads'}")
    print(f"  eleuther-interp ({decoded} decoding): {ours_tps:8.1f} tokens/s  ({ours_s:.1f} s, steps after the first)  "
          f"CPU {ours_cpu:.1f} s (whole run)  peak RSS {ours_peak:.0f} MiB  mean KL last step {ours_loss:.4f}")
    print(f"  {t['impl']}: {t['tokens_per_s']:8.1f} tokens/s  ({t['seconds']:.1f} s, steps after the first)  CPU {t['cpu_seconds']:.1f} s (all steps)  "
          f"peak RSS {t['peak_rss_mib']:.0f} MiB  mean KL last step {t['mean_loss_last_step']:.4f}")
    print(f"  ratio ours/theirs (throughput): {ours_tps / t['tokens_per_s']:.2f}; "
          f"CPU seconds theirs/ours: {t['cpu_seconds'] / ours_cpu:.2f} (a shared machine inflates both)")
    if args.device != "cpu" and args.shape != "smollm2":
        flops = lens_training_flops_per_token(config_for(args.shape), args.seq)
        print(f"  tuned-lens peak device memory {t['device_mem_peak_mib']:.0f} MiB")
        for name, tps in [("eleuther-interp", ours_tps), ("tuned-lens", t["tokens_per_s"])]:
            print(f"  {name}: {flops * tps / 1e12:.1f} TFLOP/s = {100 * flops * tps / (args.peak_tflops * 1e12):.1f}% "
                  f"of {args.peak_tflops:.0f} TFLOP/s (floor: {flops / 1e9:.2f} GFLOP per token)")


if __name__ == "__main__":
    main()
