#!/usr/bin/env python3
"""The simulation scorer's reading: eleuther-interp against transformers, side by side in one
run, on the same prompts with the real SmolLM2-135M-Instruct GGUF (dequantised to float32 by
both sides).

delphi's simulator (all-at-once, logprob mode) gets its numbers from vLLM's `prompt_logprobs`:
one forward pass over each whole prompt, the explanation and the excerpt's `token<tab>unknown`
lines, read at every token's tab. vLLM needs a GPU, so the peer here is that computation in
transformers: one forward pass per excerpt (batch 1, no KV cache), the log-probabilities of the
levels (our scorer's digits "0".."9") at each piece's last token, normalised into an expected
value and scaled to 0-10 as ours. A second peer run is the best a transformers user could do
(and what vLLM's automatic prefix caching does): the prompt, which every excerpt of a latent
shares, run once, its KV cache reused by each excerpt (cropped back after each). Ours is
`delphi::score::simulate` with `LocalLlm`: the prompt run once into our hook runtime's KV
cache, which the excerpts continue in batches of 8 (right-padded), the unembedding applied
only at the reading points.
Our program (`bench/simulation_bench.rs`) cuts the excerpts from WikiText-2 and dumps
its requests (chat messages and answer pieces), which the peer runs as they are; the script
checks that both sides' expected activations agree.

Each side runs in its own child process (peak RSS measured separately); model loading is timed
apart and left out of the rate. Needs a Python with torch + transformers + gguf (the reference
venv of tests/fixtures/README.md).

    python bench/simulation.py [--excerpts 50] [--tokens 32] [--threads 2]
"""
import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WIKITEXT = REPO / "data" / "wikitext-2-raw-test.txt"


def run_peer(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    gguf = Path(args.gguf)
    started = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model = model.eval().requires_grad_(False)
    load_s = time.perf_counter() - started
    requests = json.loads(Path(args.requests).read_text())
    levels = []
    for level in requests[0]["levels"]:
        ids = tok(level, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            levels.append((int(level), ids[0]))
    top = max(int(level) for level in requests[0]["levels"])
    expected, tokens = [], 0
    cached = None  # (prompt ids, their KV cache) with --prefix-cache
    started = time.perf_counter()
    with torch.inference_mode():
        for request in requests:
            prompt = tok.apply_chat_template(request["messages"], add_generation_prompt=True, tokenize=True)
            if hasattr(prompt, "keys"):
                prompt = prompt["input_ids"]
            prompt, answer, ends = list(prompt), [], []
            for piece in request["answer"]:
                answer += tok(piece, add_special_tokens=False)["input_ids"]
                ends.append(len(answer) - 1)
            if args.prefix_cache:
                if cached is None or cached[0] != prompt:
                    out = model(input_ids=torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
                    cached = (prompt, out.past_key_values)
                    tokens += len(prompt)
                tokens += len(answer)
                logits = model(input_ids=torch.tensor([answer]), past_key_values=cached[1],
                               use_cache=True).logits[0, ends]
                cached[1].crop(-len(answer))  # back to the prompt (transformers 5: tokens to drop)
            else:
                ids = prompt + answer
                tokens += len(ids)
                ends = [len(prompt) + end for end in ends]
                logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, ends]
            logprobs = torch.log_softmax(logits.double(), -1)
            probs = logprobs[:, [i for _, i in levels]].exp()
            values = torch.tensor([float(v) for v, _ in levels], dtype=torch.float64)
            expected.append(((probs * values).sum(-1) / probs.sum(-1) * (10 / top)).tolist())
    seconds = time.perf_counter() - started
    import transformers
    how = "prompt's KV cache reused" if args.prefix_cache else "whole prompt per excerpt"
    print(json.dumps({"impl": f"transformers {transformers.__version__} / torch {torch.__version__}, {how}",
                      "excerpts": len(requests), "load_s": load_s, "seconds": seconds,
                      "excerpts_per_s": len(requests) / seconds, "prompt_tokens": tokens,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "expected": expected}))


def child(cmd, env):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"command failed: {' '.join(map(str, cmd))}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--excerpts", type=int, default=50, help="excerpts simulated (delphi scores 100 per latent)")
    p.add_argument("--tokens", type=int, default=32, help="tokens per excerpt (delphi's window)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--prefix-cache", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--gguf", help=argparse.SUPPRESS)
    p.add_argument("--requests", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.peer:
        return run_peer(args)

    subprocess.run(["cargo", "build", "--release", "-q", "-p", "eleuther-hooks", "--bin", "hooks",
                    "-p", "eleuther-delphi", "--example", "simulation_bench"], cwd=REPO, check=True)
    release = REPO / "target" / "release"
    gguf = subprocess.run([str(release / "hooks"), "fetch", "smollm2"], check=True, capture_output=True,
                          text=True).stdout.strip()
    work = REPO / "target" / "bench" / "simulation"
    work.mkdir(parents=True, exist_ok=True)
    requests = work / "requests.json"
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    ours = child([str(release / "examples" / "simulation_bench"), gguf, str(WIKITEXT),
                  "--excerpts", str(args.excerpts), "--tokens", str(args.tokens), "--dump", str(requests)], env)
    peer = [sys.executable, __file__, "--peer", "--gguf", gguf, "--requests", str(requests),
            "--threads", str(args.threads)]
    peers = [child(peer, env), child(peer + ["--prefix-cache"], env)]

    print(f"simulation scorer, {args.excerpts} excerpts of {args.tokens} tokens, SmolLM2-135M-Instruct "
          f"(f32), {args.threads} threads")
    for r in [ours] + peers:
        print(f"  {r['impl']}: {r['excerpts_per_s']:.3f} excerpts/s ({r['seconds']:.1f} s, load "
              f"{r['load_s']:.1f} s), {r['prompt_tokens']} tokens through the model, peak RSS "
              f"{r['peak_rss_mib']:.0f} MiB")
    disagree = False
    for theirs in peers:
        diffs = [abs(a - b) for xs, ys in zip(ours["expected"], theirs["expected"]) for a, b in zip(xs, ys)]
        assert len(diffs) == args.excerpts * args.tokens, "the two sides read different numbers of places"
        print(f"  ratio ours/theirs ({theirs['impl']}): "
              f"{ours['excerpts_per_s'] / theirs['excerpts_per_s']:.2f} "
              f"(peak RSS {ours['peak_rss_mib'] / theirs['peak_rss_mib']:.2f}); expected activations "
              f"agree: largest difference {max(diffs):.2e}, mean {sum(diffs) / len(diffs):.2e} (levels 0-10)")
        disagree |= not all(math.isfinite(d) for d in diffs) or max(diffs) > 1e-2
    if disagree:
        sys.exit("the two sides disagree")


if __name__ == "__main__":
    main()
