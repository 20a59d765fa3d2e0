#!/usr/bin/env python3
"""Lens evaluation throughput: eleuther-interp (`lens eval`) vs PyPI tuned-lens, side by side in
one run, on the same model, the same tokens and the same tuned lens: per layer, for the logit
lens and the tuned lens, the next-token cross-entropy, the entropy and KL(model ‖ lens).

The peer is tuned-lens's evaluation step (`tuned_lens/scripts/eval_loop.py`,
`_evaluate_lenses_on_hidden`: model forward with output_hidden_states, then per layer and
lens a log-softmax, cross-entropy, entropy and KL over the whole vocabulary), driven by a
small loop here because its CLI needs the datasets library and the hub. Ours also counts
top-1 agreement and prediction depth, which tuned-lens does not. The lens is trained once by
our `lens train` (two short steps: only its shape matters for speed) and read by tuned-lens's
`TunedLens` from our params.safetensors (the same `{i}.weight` / `{i}.bias` keys as its
params.pt). Both sides are timed from the first forward pass to the last metric, model
loading excluded.

    python bench/lens_eval.py [--shape pythia-160m|smollm2] [--tokens 2048] [--seq 256] [--threads 2]
                              [--chunk-tokens 512] [--device cpu|cuda] [--prebuilt DIR]

On a GPU tuned-lens evaluates under float16 autocast (eval_loop.py's `th.autocast("cuda")`,
whose default dtype that is) while ours stays f32 there; both timings include the first
batch's start-up costs (kernels compiled, cuBLAS set up), so give --tokens enough batches.
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
from forward import SHAPES, bench_model, child, our_binaries, peer_model, wikitext_tokens  # noqa: E402


def peer(args):
    import torch
    from safetensors.torch import load_file
    from tuned_lens.nn.lenses import LogitLens, TunedLens

    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    model = peer_model(args.model_path, args.device)
    tuned = TunedLens.from_model(model).float()
    tuned.layer_translators.load_state_dict(load_file(Path(args.lens) / "params.safetensors"))
    lenses = {"logit": LogitLens.from_model(model).to(args.device), "tuned": tuned.to(args.device)}
    tokens = np.load(args.tokens).astype(np.int64)[: args.tokens_to_eval // args.seq]
    sums = {name: {"ce": 0.0, "entropy": 0.0, "kl": 0.0} for name in lenses}
    layers = model.config.num_hidden_layers
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast("cuda", enabled=cuda):
        for row in range(0, len(tokens), args.batch):
            ids = torch.from_numpy(tokens[row:row + args.batch]).to(args.device)
            out = model(ids, output_hidden_states=True)
            final_lps = out.logits.log_softmax(dim=-1)
            final_probs = final_lps.exp()
            labels = ids[:, 1:]
            for j, h in enumerate(out.hidden_states[:-1]):
                for name, lens in lenses.items():
                    lens_lps = lens(h, idx=j).log_softmax(dim=-1)
                    lens_probs = lens_lps.exp()
                    ce = torch.nn.functional.cross_entropy(lens_lps[:, :-1].flatten(0, 1), labels.flatten(),
                                                           reduction="none")
                    entropy = torch.sum(-lens_probs * lens_lps, dim=-1)
                    kl = torch.sum(final_probs * (final_lps - lens_lps), dim=-1)
                    if j == layers - 1:  # keep the last layer's means, as a check against ours
                        sums[name]["ce"] += ce.mean().item() / (len(tokens) / args.batch)
                        sums[name]["entropy"] += entropy.mean().item() / (len(tokens) / args.batch)
                        sums[name]["kl"] += kl.mean().item() / (len(tokens) / args.batch)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(json.dumps({"impl": f"tuned-lens {importlib.metadata.version('tuned-lens')}", "seconds": seconds,
                      "tokens_per_s": len(tokens) * args.seq / seconds, "last_layer": sums,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "device_mem_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else 0}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="pythia-160m", choices=sorted(SHAPES) + ["smollm2"])
    p.add_argument("--tokens", type=int, default=2048, help="tokens evaluated (whole sequences of --seq)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=1, help="sequences per forward pass, both sides")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--chunk-tokens", type=int, default=512, help="our `lens eval --chunk-tokens`")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--prebuilt", help="a folder with our lens, hooks and forward_bench binaries (skips cargo build)")
    p.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-path", help=argparse.SUPPRESS)
    p.add_argument("--lens", help=argparse.SUPPRESS)
    p.add_argument("--token-file", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.tokens % args.seq or args.tokens // args.seq % args.batch:
        p.error("--tokens must be a whole number of batches of --batch sequences of --seq tokens")
    if args.peer:
        args.tokens_to_eval, args.tokens = args.tokens, args.token_file
        return peer(args)

    binaries = our_binaries(args.prebuilt, "lens")
    bench = REPO / "target" / "bench"
    model_path = str(bench_model(args.shape, binaries))
    npy = bench / f"lens-eval-tokens-{args.shape}-{args.seq}.npy"
    wikitext_tokens(binaries, model_path, npy, args.seq, max(args.tokens, 2 * args.seq))
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    lens_dir = bench / f"lens-eval-{args.shape}"
    subprocess.run(["rm", "-rf", str(lens_dir)], check=True)
    subprocess.run([str(binaries["lens"]), "train", "--model", model_path, "--data", str(npy),
                    "--seq-len", str(args.seq), "--tokens-per-step", str(args.seq), "--steps", "2",
                    "--checkpoint-every", "0", "--output", str(lens_dir), "--device", args.device],
                   env=env, check=True, capture_output=True)

    report = bench / f"lens-eval-{args.shape}.json"
    cmd = [str(binaries["lens"]), "eval", "--model", model_path, "--data", str(npy), "--seq-len", str(args.seq),
           "--batch-size", str(args.batch), "--lens", str(lens_dir), "--tokens", str(args.tokens),
           "--chunk-tokens", str(args.chunk_tokens), "--device", args.device, "--json", str(report)]
    ours = subprocess.run(["/usr/bin/time", "-f", "%M"] + cmd, env=env, capture_output=True, text=True)
    if ours.returncode != 0:
        sys.exit(ours.stderr)
    m = re.search(r"evaluated (\d+) tokens in ([\d.]+) s \(([\d.]+) tokens/s", ours.stderr)
    if m is None:
        sys.exit(f"`lens eval` printed no throughput line:\n{ours.stderr}")
    ours_s, ours_tps = float(m.group(2)), float(m.group(3))
    ours_peak = int(ours.stderr.strip().splitlines()[-1]) / 1024
    mine = json.loads(report.read_text())
    last = -2  # the last layer's row (the one after it is the model's output)
    ours_last = {"logit": mine["logit_lens"][last], "tuned": mine["tuned_lens"][last]}

    t = child([sys.executable, __file__, "--peer", "--model-path", model_path, "--lens", str(lens_dir),
               "--token-file", str(npy), "--tokens", str(args.tokens), "--seq", str(args.seq),
               "--batch", str(args.batch), "--threads", str(args.threads), "--device", args.device], env)
    print(f"lens evaluation, {args.shape}, {args.tokens} tokens (seq {args.seq}, batch {args.batch}), logit and "
          f"tuned lens at every layer, {args.device if args.device != 'cpu' else f'{args.threads} threads'}")
    print(f"  eleuther-interp: {ours_tps:8.1f} tokens/s  ({ours_s:.1f} s)  peak RSS {ours_peak:.0f} MiB")
    print(f"  {t['impl']}: {t['tokens_per_s']:8.1f} tokens/s  ({t['seconds']:.1f} s)  peak RSS {t['peak_rss_mib']:.0f} MiB")
    print(f"  ratio ours/theirs (throughput): {ours_tps / t['tokens_per_s']:.2f}")
    for name in ("logit", "tuned"):
        a, b = ours_last[name], t["last_layer"][name]
        print(f"  {name} lens, last layer, ours / theirs: CE {a['ce']:.4f} / {b['ce']:.4f}, "
              f"entropy {a['entropy']:.4f} / {b['entropy']:.4f}, KL {a['kl']:.4f} / {b['kl']:.4f}")


if __name__ == "__main__":
    main()
