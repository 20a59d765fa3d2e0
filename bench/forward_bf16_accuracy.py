#!/usr/bin/env python3
"""How close a bfloat16 forward pass comes to float32, ours against transformers', on the
models of bench/forward.py and its token ids: both implementations run in bf16 and in f32,
and each logit array is compared with transformers' f32 logits (largest difference relative
to the largest logit, agreement of the top token, mean KL divergence from the f32
distribution). Ours runs through `hooks cache --hookpoints logits` on the CPU. Not a timing.

    python bench/forward_bf16_accuracy.py [--shape pythia-160m|smollm2] [--batch 2] [--seq 128]

Needs a Python with torch + transformers + safetensors (and gguf for smollm2).
"""
import argparse
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from forward import SHAPES, bench_model, config_for, our_binaries, token_ids


def ours(hooks, model, ids_file, dtype, seq, out):
    subprocess.run([str(hooks), "cache", "--model", str(model), "--dtype", dtype, "--store-dtype", "float32",
                    "--data", str(ids_file), "--seq-len", str(seq), "--hookpoints", "logits", "-o", str(out),
                    "--batch-size", "8"], check=True, capture_output=True)
    shards = sorted((out / "shards").glob("*.safetensors"))
    return np.concatenate([load_file(s)["logits"] for s in shards]).astype(np.float64)


def theirs(model, ids, dtype):
    path = Path(model)
    extra = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    net = AutoModelForCausalLM.from_pretrained(path.parent if extra else path, dtype=dtype, **extra)
    with torch.no_grad():
        logits = net(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()
    return logits.reshape(-1, logits.shape[-1]).astype(np.float64)


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="pythia-160m", choices=sorted(SHAPES) + ["smollm2"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    binaries = our_binaries(None)
    model = bench_model(args.shape, binaries)
    vocab = 49152 if args.shape == "smollm2" else config_for(args.shape)["vocab_size"]
    ids = np.array(token_ids(args.batch, args.seq, vocab), dtype=np.uint32)
    logits = {}
    with tempfile.TemporaryDirectory() as tmp:
        ids_file = Path(tmp) / "ids.npy"
        np.save(ids_file, ids)
        for dtype in ("float32", "bfloat16"):
            logits[f"ours {dtype}"] = ours(binaries["hooks"], model, ids_file, dtype, args.seq, Path(tmp) / dtype)
    for dtype, torch_dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        logits[f"transformers {dtype}"] = theirs(model, ids, torch_dtype)
    reference = logits["transformers float32"]
    scale, top, log_p = np.abs(reference).max(), reference.argmax(-1), log_softmax(reference)
    print(f"{args.shape}, {args.batch} x {args.seq} tokens, each against transformers float32:")
    for name in ("ours float32", "ours bfloat16", "transformers bfloat16"):
        x = logits[name]
        kl = (np.exp(log_p) * (log_p - log_softmax(x))).sum(-1).mean()
        print(f"  {name:22s} max |diff| / max |logit| {np.abs(x - reference).max() / scale:.4f}   "
              f"top-1 agreement {(x.argmax(-1) == top).mean():.3f}   mean KL {kl:.5f}")


if __name__ == "__main__":
    main()
