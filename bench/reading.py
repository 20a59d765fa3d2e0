#!/usr/bin/env python3
"""The scorers that read prompt log-probabilities, simulation (`--scorer simulation`, the
default) and surprisal (`--scorer surprisal`): eleuther-interp against transformers, side by
side in one run, on the same prompts with the real SmolLM2-135M-Instruct GGUF (dequantised to
float32 by both sides).

Simulation:

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

Surprisal: delphi's `SurprisalScorer` runs in transformers on a base model: each prompt (the
few-shot descriptions, then the placeholder or the explanation) once into a KV cache for a
batch of 10, each batch of 10 texts right-padded after it, every text token's cross-entropy
taken. The peer does that (its cache cropped back to the prompt after each batch: delphi
lets the cache grow across batches, so that later batches also see earlier batches' texts, a
bug left out here), and scores every token of each text, as ours does (delphi leaves out the
first). Ours is `delphi::score::surprisal` with `LocalLlm`: each prompt once into our KV cache,
the texts in batches of 8 after it.

Our program (`bench/reading_bench.rs`) cuts the excerpts from WikiText-2 and dumps its
requests, which the peer runs as they are; the script checks that both sides' numbers agree.

Each side runs in its own child process (peak RSS measured separately); model loading is timed
apart and left out of the rate. Needs a Python with torch + transformers + gguf (the reference
venv of tests/fixtures/README.md).

    python bench/reading.py [--scorer simulation] [--excerpts 50] [--tokens 32] [--threads 2]
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

from bench_child import child

REPO = Path(__file__).resolve().parent.parent
WIKITEXT = REPO / "data" / "wikitext-2-raw-test.txt"


def load_peer(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    gguf = Path(args.gguf)
    started = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model = model.eval().requires_grad_(False)
    return tok, model, time.perf_counter() - started


def report_peer(how, requests, load_s, seconds, tokens, compared):
    import torch
    import transformers
    print(json.dumps({"impl": f"transformers {transformers.__version__} / torch {torch.__version__}, {how}",
                      "excerpts": requests, "load_s": load_s, "seconds": seconds,
                      "excerpts_per_s": requests / seconds, "prompt_tokens": tokens,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "compared": compared}))


def run_surprisal_peer(args):
    """delphi's SurprisalScorer computation: per prompt, a batch-10 KV cache, texts right-padded."""
    import torch

    tok, model, load_s = load_peer(args)
    requests = json.loads(Path(args.requests).read_text())
    batch = 10
    tokens, surprisals = 0, []
    started = time.perf_counter()
    with torch.inference_mode():
        for request in requests:
            prompt = tok(request["prompt"], add_special_tokens=False)["input_ids"]
            texts = [tok(t, add_special_tokens=False)["input_ids"] for t in request["texts"]]
            per_text = []
            cache, first, cached_batch = None, None, 0
            for start in range(0, len(texts), batch):
                chunk = texts[start:start + batch]
                if cached_batch != len(chunk):
                    # The prompt's last position also gives each text's first token.
                    out = model(input_ids=torch.tensor([prompt] * len(chunk)), use_cache=True, logits_to_keep=1)
                    cache, cached_batch = out.past_key_values, len(chunk)
                    tokens += len(prompt) * len(chunk)
                    first = torch.log_softmax(out.logits[:, -1].double(), -1)
                width = max(len(t) for t in chunk)
                ids = torch.tensor([t + [0] * (width - len(t)) for t in chunk])
                tokens += sum(len(t) for t in chunk)
                logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
                cache.crop(-width)  # back to the prompt (transformers 5: tokens to drop)
                logprobs = torch.log_softmax(logits.double(), -1)
                for row, text in enumerate(chunk):
                    values = [-float(first[row, text[0]])] if text else []
                    values += [-float(logprobs[row, j - 1, text[j]]) for j in range(1, len(text))]
                    per_text.append(values)
            surprisals.append(per_text)
    seconds = time.perf_counter() - started
    compared = [[surprisals[0][i], surprisals[1][i]] for i in range(len(surprisals[0]))]
    report_peer("prompt's KV cache for a batch of 10, as delphi", len(requests[0]["texts"]), load_s, seconds,
                tokens, compared)


def run_peer(args):
    import torch

    tok, model, load_s = load_peer(args)
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
    how = "prompt's KV cache reused" if args.prefix_cache else "whole prompt per excerpt"
    report_peer(how, len(requests), load_s, seconds, tokens, expected)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scorer", choices=["simulation", "surprisal"], default="simulation")
    p.add_argument("--excerpts", type=int, default=50, help="excerpts scored (delphi scores 100 per latent)")
    p.add_argument("--tokens", type=int, default=32, help="tokens per excerpt (delphi's window)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--prefix-cache", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--gguf", help=argparse.SUPPRESS)
    p.add_argument("--requests", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.peer:
        return run_peer(args) if args.scorer == "simulation" else run_surprisal_peer(args)

    subprocess.run(["cargo", "build", "--release", "-q", "-p", "eleuther-hooks", "--bin", "hooks",
                    "-p", "eleuther-delphi", "--example", "reading_bench"], cwd=REPO, check=True)
    release = REPO / "target" / "release"
    gguf = subprocess.run([str(release / "hooks"), "fetch", "smollm2"], check=True, capture_output=True,
                          text=True).stdout.strip()
    work = REPO / "target" / "bench" / args.scorer
    work.mkdir(parents=True, exist_ok=True)
    requests = work / "requests.json"
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    ours = child([str(release / "examples" / "reading_bench"), gguf, str(WIKITEXT), "--scorer", args.scorer,
                  "--excerpts", str(args.excerpts), "--tokens", str(args.tokens), "--dump", str(requests)], env)
    peer = [sys.executable, __file__, "--peer", "--scorer", args.scorer, "--gguf", gguf, "--requests",
            str(requests), "--threads", str(args.threads)]
    if args.scorer == "simulation":
        peers = [child(peer, env), child(peer + ["--prefix-cache"], env)]
    else:
        peers = [child(peer, env)]

    print(f"{args.scorer} scorer, {args.excerpts} excerpts of {args.tokens} tokens, SmolLM2-135M-Instruct "
          f"(f32), {args.threads} threads")
    for r in [ours] + peers:
        print(f"  {r['impl']}: {r['excerpts_per_s']:.3f} excerpts/s ({r['seconds']:.1f} s, load "
              f"{r['load_s']:.1f} s), {r['prompt_tokens']} tokens through the model, peak RSS "
              f"{r['peak_rss_mib']:.0f} MiB")
    # Per excerpt: expected activations (simulation), or per prompt the surprisal per token.
    flat = (lambda rows: [x for row in rows for x in row]) if args.scorer == "simulation" else \
        (lambda rows: [x for row in rows for part in row for x in part])
    what = "expected activations (levels 0-10)" if args.scorer == "simulation" else "surprisals (nats)"
    disagree = False
    for theirs in peers:
        mine, peer_values = flat(ours["compared"]), flat(theirs["compared"])
        assert len(mine) == len(peer_values), "the two sides read different numbers of places"
        diffs = [abs(a - b) for a, b in zip(mine, peer_values)]
        print(f"  ratio ours/theirs ({theirs['impl']}): "
              f"{ours['excerpts_per_s'] / theirs['excerpts_per_s']:.2f} "
              f"(peak RSS {ours['peak_rss_mib'] / theirs['peak_rss_mib']:.2f}); {what} "
              f"agree: largest difference {max(diffs):.2e}, mean {sum(diffs) / len(diffs):.2e} over {len(diffs)}")
        disagree |= not all(math.isfinite(d) for d in diffs) or max(diffs) > 1e-2
    if disagree:
        sys.exit("the two sides disagree")


if __name__ == "__main__":
    main()
