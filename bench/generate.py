#!/usr/bin/env python3
"""Greedy generation through the hook runtime (`Model::generate`, KV cache, hooks at every
step) against transformers' `generate`, side by side in one run: the real SmolLM2-135M-Instruct
GGUF, dequantised to float32 by both sides, the first `--prompt-tokens` tokens of WikiText-2 as
the prompt, `--new-tokens` tokens generated with no stop token. Two runs per side: plain, and
steered (a vector, the prompt's first token's embedding scaled to norm 96, added to the
output of layer 10 at every pass: our `layers.10` hook, a forward hook in transformers). The
script checks that both sides generate the same tokens.

Each side runs in its own child process (peak RSS measured separately); model loading is left
out of the rates, and each side first generates 2 tokens untimed (a warm-up). Needs a Python with torch + transformers + gguf (the reference venv of
tests/fixtures/README.md).

`--quantized` keeps the file's quantized weights on our side (transformers always dequantises
them); `--requantize q8_0|q4_0` runs both sides on a copy of the file whose blocks' weights are
re-quantized to that type (written once to the temporary folder by our side).

    python bench/generate.py [--prompt-tokens 128] [--new-tokens 128] [--threads 2]
        [--quantized] [--requantize q8_0|q4_0]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench_child import child

REPO = Path(__file__).resolve().parent.parent
WIKITEXT = REPO / "data" / "wikitext-2-raw-test.txt"
LAYER, SCALE = 10, 96.0


def run_peer(args):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    gguf = Path(args.gguf)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model = model.eval().requires_grad_(False)
    load_s = time.perf_counter() - started
    prompt = json.loads(args.prompt)
    direction = model.model.embed_tokens.weight[prompt[0]].float()
    vector = SCALE * direction / direction.norm()

    def add_vector(module, inputs, output):
        if isinstance(output, tuple):
            return (output[0] + vector,) + output[1:]
        return output + vector

    runs = []
    with torch.inference_mode():
        model.generate(torch.tensor([prompt]), max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
        for steered in (False, True):
            handle = model.model.layers[LAYER].register_forward_hook(add_vector) if steered else None
            started = time.perf_counter()
            out = model.generate(torch.tensor([prompt]), max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, do_sample=False)
            seconds = time.perf_counter() - started
            if handle is not None:
                handle.remove()
            ids = out[0, len(prompt):].tolist()
            runs.append({"steered": steered, "seconds": seconds, "new_tokens": len(ids),
                         "tokens_per_s": len(ids) / seconds, "ids": ids})
    import transformers
    print(json.dumps({"impl": f"transformers {transformers.__version__} / torch {torch.__version__}",
                      "load_s": load_s, "runs": runs,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quantized", action="store_true", help="keep the quantized weights (our side)")
    p.add_argument("--requantize", choices=["q8_0", "q4_0"], help="run a copy re-quantized to this type")
    p.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--gguf", help=argparse.SUPPRESS)
    p.add_argument("--prompt", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.peer:
        return run_peer(args)

    subprocess.run(["cargo", "build", "--release", "-q", "-p", "eleuther-hooks", "--bin", "hooks",
                    "--example", "generate_bench"], cwd=REPO, check=True)
    release = REPO / "target" / "release"
    gguf = subprocess.run([str(release / "hooks"), "fetch", "smollm2"], check=True, capture_output=True,
                          text=True).stdout.strip()
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    ours = child([str(release / "examples" / "generate_bench"), gguf, str(WIKITEXT),
                  "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
                  "--steer-layer", str(LAYER), "--steer-scale", str(SCALE)]
                 + (["--quantized"] if args.quantized else [])
                 + (["--requantize", args.requantize] if args.requantize else []), env)
    theirs = child([sys.executable, __file__, "--peer", "--gguf", ours["model"], "--prompt", json.dumps(ours["prompt"]),
                    "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)], env)

    weights = "quantized weights kept (ours)" if args.quantized else "f32"
    print(f"greedy generation, {Path(ours['model']).name} ({weights}), prompt {len(ours['prompt'])} tokens, "
          f"{args.new_tokens} new tokens, {args.threads} threads")
    for r in (ours, theirs):
        rates = ", ".join(f"{'steered' if run['steered'] else 'plain'} {run['tokens_per_s']:.1f} tokens/s "
                          f"({run['seconds']:.2f} s)" for run in r["runs"])
        print(f"  {r['impl']}: {rates}; load {r['load_s']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB")
    same = True
    for mine, peer in zip(ours["runs"], theirs["runs"]):
        kind = "steered" if mine["steered"] else "plain"
        agree = next((i for i, (a, b) in enumerate(zip(mine["ids"], peer["ids"])) if a != b), len(mine["ids"]))
        same &= agree == len(mine["ids"]) == len(peer["ids"])
        print(f"  {kind}: ratio ours/theirs {mine['tokens_per_s'] / peer['tokens_per_s']:.2f}; "
              f"same tokens for the first {agree} of {len(mine['ids'])}")
    print(f"  peak RSS ratio {ours['peak_rss_mib'] / theirs['peak_rss_mib']:.2f}")
    if not same:
        print("  (greedy decoding diverges after a near tie: float rounding differs between the sides)")


if __name__ == "__main__":
    main()
