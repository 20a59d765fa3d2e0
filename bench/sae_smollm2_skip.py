#!/usr/bin/env python3
"""`sae train --skip-first-positions` on a real model (docs/sae-smollm2.md): the same
cached SmolLM2 `layers.15` activations, seed, steps and recipe, trained with and without
the rows at position 0 of each sequence (SmolLM2's "massive activations"), then scored on a
held-out cache.

Runs (each `sae train --activations CACHE`, same seed, so the same initial weights):

* all positions:  sparsify's recipe (`--skip-first-positions 0`);
* skip pos. 0:    `--skip-first-positions 1`;
* skip + AuxK:    `--skip-first-positions 1 --auxk-alpha 1/32` (with `--auxk`).

Every run takes the same number of steps of the same size, the most the cache allows
without position 0 (127 steps of 1,024 rows for 512 sequences of 256 tokens). Held-out
scores come from `eleuther_interp.Sae.forward` over the held-out cache read in order (row
`i` is at position `i % seq_len`): FVU over all positions, over positions >= 1, and over
the "ordinary" rows, positions >= 1 without the few rows whose norm exceeds
`--massive-norm` (massive activations away from position 0: 2 of 16,320 held-out rows hold
two thirds of the variance of positions >= 1), each one mean over its whole set as
`sae eval` computes it; L0; the latents that never fire on held-out positions >= 1; and
each run's dead fraction at its last step.

Needs the release `sae` binary and the Python package built in place
(`python/run-tests` does it). Run with any Python that has numpy:

    python bench/sae_smollm2_skip.py --cache CACHE --heldout HELDOUT --out DIR
        [--batch 1024] [--k 32] [--latents 18432] [--warmup 10] [--seed 42]
        [--dead-threshold 65536] [--auxk] [--threads 2] [--massive-norm 2000] [--sae-bin PATH]

Writes DIR/results.json and prints a markdown table. Finished runs in DIR are reused.
"""
import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "python"))
import eleuther_interp as ei  # noqa: E402


def train(args, out: Path, steps: int, skip: int, auxk: float):
    """`sae train` into `out`; returns (command, history, seconds)."""
    cmd = [str(args.sae_bin), "train", "--activations", str(args.cache), "--hookpoints", args.point,
           "--output", str(out), "--batch-size", str(args.batch), "--steps", str(steps), "--k", str(args.k),
           "--num-latents", str(args.latents), "--lr-warmup-steps", str(args.warmup),
           "--dead-feature-threshold", str(args.dead_threshold), "--chunk-tokens", str(args.batch),
           "--checkpoint-every", "0", "--seed", str(args.seed), "--shuffle-buffer", str(args.shuffle_buffer),
           "--skip-first-positions", str(skip), "--auxk-alpha", repr(auxk)]
    history_file = out / "checkpoints" / args.point / "history.json"
    if history_file.exists():
        return cmd, json.loads(history_file.read_text()), json.loads((out / "seconds.json").read_text())
    subprocess.run(["rm", "-rf", str(out)], check=True)
    print("$", " ".join(cmd), flush=True)
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(done.stdout + done.stderr)
    seconds = float(re.search(r"this run: \d+ steps in ([\d.]+) s", done.stdout).group(1))
    (out / "seconds.json").write_text(json.dumps(seconds))
    return cmd, json.loads(history_file.read_text()), seconds


def heldout_rows(path: Path, point: str):
    """The held-out activations `[n, d]` (float64) and each row's position."""
    cache = ei.ActivationCache(path)
    seq_len = cache.manifest["settings"]["data"]["seq_len"]
    rows = np.concatenate([b[point] for b in cache.batches(8192)]).astype(np.float64)
    return rows, np.arange(len(rows)) % seq_len


def score(sae: "ei.Sae", rows: np.ndarray, positions: np.ndarray, massive_norm: float) -> dict:
    """Held-out FVU (all positions, positions >= 1, ordinary rows), L0 and never-firing
    latents."""
    x_hat = np.concatenate([sae.forward(rows[i:i + 4096].astype(np.float32))["x_hat"]
                            for i in range(0, len(rows), 4096)]).astype(np.float64)
    later = positions >= 1
    ordinary = later & (np.linalg.norm(rows, axis=1) <= massive_norm)

    def fvu(mask):
        x = rows[mask]
        return float(((x - x_hat[mask]) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())

    fired = np.zeros(sae.num_latents, bool)
    active = 0
    for i in range(0, int(later.sum()), 4096):
        acts, indices = sae.encode(rows[later][i:i + 4096].astype(np.float32))
        fired[indices[acts > 0]] = True
        active += int((acts > 0).sum())
    return {"fvu_all": fvu(np.ones(len(rows), bool)), "fvu_pos_ge_1": fvu(later),
            "fvu_ordinary": fvu(ordinary), "massive_rows_pos_ge_1": int((later & ~ordinary).sum()),
            "l0_pos_ge_1": active / int(later.sum()), "never_fire_pct": 100.0 * float(1 - fired.mean())}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--heldout", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--point", default="layers.15")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--latents", type=int, default=18432)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--dead-threshold", type=int, default=65536)
    p.add_argument("--shuffle-buffer", type=int, default=131072)
    p.add_argument("--auxk", action="store_true", help="also train skip + AuxK (alpha 1/32)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--massive-norm", type=float, default=2000.0,
                   help="rows above this norm are left out of the 'ordinary' FVU (median norm ~170)")
    p.add_argument("--sae-bin", type=Path, default=REPO / "target/release/sae")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    manifest = ei.ActivationCache(args.cache).manifest
    seq_len = manifest["settings"]["data"]["seq_len"]
    steps = manifest["chunks"] * (seq_len - 1) // args.batch
    runs = [("all positions", "all", 0, 0.0), ("skip position 0", "skip1", 1, 0.0)]
    if args.auxk:
        runs.append(("skip position 0 + AuxK 1/32", "skip1-auxk", 1, 1 / 32))
    rows, positions = heldout_rows(args.heldout, args.point)
    print(f"held out: {len(rows)} rows; {steps} steps of {args.batch} rows per run", flush=True)
    results = []
    for label, name, skip, auxk in runs:
        out = args.out / name
        cmd, history, seconds = train(args, out, steps, skip, auxk)
        sae = ei.Sae.load(out / args.point)
        last = history[-1]
        result = {"run": label, "command": " ".join(cmd), "seconds": seconds, "steps": len(history),
                  "train_fvu_last10": float(np.mean([r["fvu"] for r in history[-10:]])),
                  "dead_pct_end": 100.0 * last["dead_fraction"], **score(sae, rows, positions, args.massive_norm)}
        print(json.dumps(result), flush=True)
        results.append(result)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n| run | held-out FVU, ordinary rows | positions >= 1 | all positions | L0 | never fire on held-out (%) "
          "| dead at end of training (%) | training FVU, last 10 steps | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['run']} | {r['fvu_ordinary']:.4f} | {r['fvu_pos_ge_1']:.4f} | {r['fvu_all']:.4f} | {r['l0_pos_ge_1']:.2f} | "
              f"{r['never_fire_pct']:.2f} | {r['dead_pct_end']:.2f} | {r['train_fvu_last10']:.4f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
