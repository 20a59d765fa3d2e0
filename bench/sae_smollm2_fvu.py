#!/usr/bin/env python3
"""FVU of our TopK SAE trainer vs PyPI eai-sparsify's on identical cached activations of a
real model (docs/sae-smollm2.md: SmolLM2-135M-Instruct, `layers.15`, WikiText-2).

Three runs, same k, width, batch (tokens per step), steps, learning rate, warm-up and Adam:

* ours:               `sae train --activations CACHE` (reads the cache shuffled with `--seed`);
* sparsify, our init: sparsify's own `Trainer.fit()` from our trainer's initial weights;
* sparsify, own init: the same, from sparsify's initialisation (`torch.manual_seed(seed)`).

Sparsify consumes the same batches in the same order: the rows are read with our cache
reader in the shuffled order `sae train` uses (`eleuther_interp.ActivationCache.batches`,
same seed and shuffle buffer: one code path, `hooks::activations::CacheReader`), and fed to
sparsify's unmodified trainer through a stand-in model whose `layers.N` module outputs those
rows (sparsify's forward hook on it sees exactly the cached activations). Sparsify's per-step
FVU is what its trainer logs (a `wandb` stand-in records `wandb.log`), ours the trainer's
`history.json`. Checks printed (and asserted where exact): the fed rows are a permutation of
the shards' rows (read directly with safetensors); our initial `b_dec` equals the mean of the
first fed batch; from the same initial weights both trainers see the same step-1 FVU.

With `--extra-seeds`, sparsify's trainer also runs on the same batches from more initial
draws, ours (exported with each seed) and its own (torch seed), to show the spread that the
initial draw alone causes.

Afterwards every final SAE is scored by one evaluator (sparsify's `SparseCoder`) on a
held-out cache: FVU, L0, latents that never fire there.

Needs the reference venv (torch + eai-sparsify), the release `sae` binary and the Python
package built in place (`python/run-tests` does it). Run:

    /work/venv-ref/bin/python bench/sae_smollm2_fvu.py --cache CACHE --heldout HELDOUT --out DIR
        [--batch 1024] [--k 32] [--latents 18432] [--warmup 10] [--lr LR] [--seed 42]
        [--dead-threshold 65536] [--extra-seeds 0,1] [--threads 2]

Writes DIR/results.json and DIR/table.md. Finished runs in DIR are reused when re-run with
the same settings (more --extra-seeds only add runs); other settings need another DIR.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import sae_train  # noqa: E402  (the shared sparsify import)


def import_sparsify():
    """sparsify's trainer with its optional imports stood in: `datasets` (type hints only),
    `schedulefree` (signum optimiser only; we use adam), `wandb` (records the logged metrics)."""
    import importlib.machinery
    import importlib.util

    for name, attrs in {"datasets": ["Dataset", "DatasetDict"], "schedulefree": ["ScheduleFreeWrapper"]}.items():
        if importlib.util.find_spec(name) is None:
            module = types.ModuleType(name)
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)
            for attr in attrs:
                setattr(module, attr, type(attr, (), {}))
            sys.modules[name] = module
    SparseCoder, SparseCoderConfig, version = sae_train.import_sparsify("cpu")
    from sparsify.config import TrainConfig
    from sparsify.trainer import Trainer

    # Imported by Trainer.fit() when logging; installed after the imports above, whose
    # dependencies probe for an installed wandb.
    wandb = sys.modules.get("wandb")
    if wandb is None or not hasattr(wandb, "logged"):
        wandb = types.ModuleType("wandb")
        wandb.logged = []
        wandb.init = lambda **kwargs: None
        wandb.log = lambda info, step: wandb.logged.append((step, dict(info)))
        sys.modules["wandb"] = wandb
    return SparseCoder, SparseCoderConfig, TrainConfig, Trainer, wandb, version


def shuffled_rows(cache: Path, point: str, batch: int, seed: int, buffer: int, steps: int) -> np.ndarray:
    """The first `steps * batch` rows in the order `sae train --activations` reads them."""
    sys.path.insert(0, str(REPO / "python"))
    import eleuther_interp as ei

    parts, have = [], 0
    for b in ei.ActivationCache(str(cache)).batches(batch, shuffle=True, seed=seed, buffer_tokens=buffer):
        parts.append(b[point])
        have += len(b[point])
        if have >= steps * batch:
            break
    rows = np.concatenate(parts)[: steps * batch]
    if len(rows) < steps * batch:
        raise SystemExit(f"the cache has {len(rows)} rows, {steps} steps x {batch} need {steps * batch}")
    return np.ascontiguousarray(rows)


def row_set(a: np.ndarray) -> np.ndarray:
    """The rows as sorted opaque byte strings (an exact multiset)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    return np.sort(a.view(np.dtype((np.void, a.shape[1] * 4))).ravel())


def run_ours(args, out: Path, steps: int, seed: int):
    """`sae train` into `out` (`seed`: initialisation and shuffle); returns (history, seconds)."""
    history_file = out / "checkpoints" / args.point / "history.json"
    if history_file.exists():
        return json.loads(history_file.read_text()), json.loads((out / "seconds.json").read_text())
    subprocess.run(["rm", "-rf", str(out)], check=True)
    cmd = [str(REPO / "target/release/sae"), "train", "--activations", str(args.cache), "--hookpoints", args.point,
           "--output", str(out), "--batch-size", str(args.batch), "--steps", str(steps), "--k", str(args.k),
           "--num-latents", str(args.latents), "--lr", repr(args.lr), "--lr-warmup-steps", str(args.warmup),
           "--dead-feature-threshold", str(args.dead_threshold), "--chunk-tokens", str(args.batch),
           "--checkpoint-every", "0", "--seed", str(seed), "--shuffle-buffer", str(args.shuffle_buffer)]
    print("$", " ".join(cmd), flush=True)
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(done.stdout + done.stderr)
    m = re.search(r"this run: \d+ steps in ([\d.]+) s", done.stdout)
    seconds = float(m.group(1))
    (out / "seconds.json").write_text(json.dumps(seconds))
    return json.loads(history_file.read_text()), seconds


def make_model(rows, layer: int):
    """A stand-in for the language model: its 'token ids' are row numbers of `rows`, and its
    module `layers.{layer}` (an identity) outputs those rows, so sparsify's forward hook on
    that module receives exactly the cached activations, batch by batch."""
    import torch
    from torch import nn

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.rows = rows
            self.layers = nn.ModuleList(nn.Identity() for _ in range(layer + 1))

        @property
        def base_model(self):
            return self

        @property
        def device(self):
            return torch.device("cpu")

        @property
        def dummy_inputs(self):
            return {"input_ids": torch.zeros(1, 1, dtype=torch.long)}

        def forward(self, input_ids):
            return self.layers[layer](self.rows[input_ids])

    return Model()


def run_sparsify(args, rows: np.ndarray, steps: int, name: str, init_file: Path | None, seed: int):
    """sparsify's Trainer.fit() on `rows` (step i = rows[i*batch:(i+1)*batch]), from the
    weights in `init_file` or else sparsify's own initialisation with torch seed `seed`;
    returns per-step FVU and dead fraction, seconds and the saved SAE's folder."""
    import torch

    result_file = args.out / f"{name}.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    SparseCoder, SparseCoderConfig, TrainConfig, Trainer, wandb, version = import_sparsify()
    torch.set_num_threads(args.threads)
    layer = int(args.point.split(".")[1])
    model = make_model(torch.from_numpy(rows), layer)
    dataset = [{"input_ids": torch.arange(i * args.batch, (i + 1) * args.batch)} for i in range(steps)]
    cfg = TrainConfig(SparseCoderConfig(num_latents=args.latents, k=args.k), batch_size=1, optimizer="adam",
                      lr=args.lr, lr_warmup_steps=args.warmup, auxk_alpha=0.0,
                      dead_feature_threshold=args.dead_threshold, hookpoints=[args.point],
                      init_seeds=[seed], save_every=10**9, log_to_wandb=True, wandb_log_frequency=1,
                      run_name=name, save_dir=str(args.out / "sparsify"))
    trainer = Trainer(cfg, dataset, model)
    sae = trainer.saes[args.point]
    if init_file is not None:
        from safetensors.torch import load_file

        ours = load_file(str(init_file))
        with torch.no_grad():
            for key, param in sae.named_parameters():
                param.copy_(ours[key])
    wandb.logged.clear()
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    logged = sorted(wandb.logged, key=lambda s: s[0])
    assert [s for s, _ in logged] == list(range(1, steps + 1)), "sparsify did not log every step"
    result = {
        "impl": f"eai-sparsify {version} Trainer (torch {torch.__version__})",
        "fvu": [info[f"fvu/{args.point}"] for _, info in logged],
        "dead_fraction": [info[f"dead_pct/{args.point}"] for _, info in logged],
        "seconds": seconds,
        "sae": str(args.out / "sparsify" / name / args.point),
    }
    result_file.write_text(json.dumps(result))
    return result


def evaluate(sae_dir: str, heldout: np.ndarray, seq_len: int, threads: int) -> dict:
    """FVU over all held-out rows and over the rows at sequence positions >= 1 alone (the
    first position carries a massive activation, see docs/sae-smollm2.md), mean L0, fraction
    of latents that never fire there; computed with sparsify's SparseCoder for every SAE."""
    import torch

    SparseCoder = import_sparsify()[0]
    torch.set_num_threads(threads)
    sae = SparseCoder.load_from_disk(sae_dir, device="cpu")
    later = np.arange(len(heldout)) % seq_len != 0
    with torch.no_grad():
        x = torch.from_numpy(heldout)
        codes = [sae.encode(x[i:i + 2048]) for i in range(0, len(x), 2048)]
        top_acts = torch.cat([c.top_acts for c in codes])
        top_indices = torch.cat([c.top_indices for c in codes])
        x_hat = sae.decode(top_acts, top_indices)
    err = (x - x_hat).double().pow(2).sum(1).numpy()
    x = x.double().numpy()

    def fvu(rows):
        return float(err[rows].sum() / ((x[rows] - x[rows].mean(0)) ** 2).sum())

    live = top_acts > 0
    fired = torch.zeros(sae.num_latents, dtype=torch.bool)
    fired[top_indices[live]] = True
    return {"fvu": fvu(slice(None)), "fvu_positions_1_on": fvu(later), "l0": int(live.sum()) / len(heldout),
            "never_fired": 1.0 - fired.float().mean().item()}


def table(results: dict, steps: int) -> str:
    """Markdown: per-step FVU of the three runs at a few steps, the mean of the last 10 steps,
    and the held-out evaluation."""
    ours = results["ours"]["fvu"]
    same = results["sparsify_our_init"]["fvu"]
    own = results["sparsify_own_init"]["fvu"]
    marks = sorted({s for s in (1, 2, 3, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 400, 500) if s <= steps} | {steps})
    lines = ["| step | ours | sparsify, our init | ours − sparsify (same init) | sparsify, own init |",
             "|---:|---:|---:|---:|---:|"]
    for s in marks:
        a, b, c = ours[s - 1], same[s - 1], own[s - 1]
        lines.append(f"| {s} | {a:.4f} | {b:.4f} | {a - b:+.1e} | {c:.4f} |")
    tail = min(10, steps)
    mean = [float(np.mean(v[-tail:])) for v in (ours, same, own)]
    lines.append(f"| mean of last {tail} | {mean[0]:.4f} | {mean[1]:.4f} | {mean[0] - mean[1]:+.1e} | {mean[2]:.4f} |")
    lines += ["", "| held-out | FVU | FVU, positions >= 1 | L0 | latents never firing | dead at the end of "
              "training | train seconds |", "|---|---:|---:|---:|---:|---:|---:|"]
    for key, label in (("ours", "ours"), ("sparsify_our_init", "sparsify, our init"),
                       ("sparsify_own_init", "sparsify, own init")):
        r = results[key]
        h = r["heldout"]
        lines.append(f"| {label} | {h['fvu']:.4f} | {h['fvu_positions_1_on']:.4f} | {h['l0']:.2f} | "
                     f"{100 * h['never_fired']:.2f}% | "
                     f"{100 * r['dead_fraction'][-1]:.2f}% | {r['seconds']:.0f} |")
    seeds = [results["settings"]["seed"]] + results["settings"]["extra_seeds"]
    if len(seeds) > 1:
        lines += ["", "| sparsify's trainer, same batches | init seed | FVU step 1 | FVU mean of last "
                  f"{tail} | held-out FVU | held-out FVU, positions >= 1 |", "|---|---:|---:|---:|---:|---:|"]
        for prefix, label in (("sparsify_our_init", "our initialisation"), ("sparsify_own_init", "its own initialisation")):
            for seed in seeds:
                r = results[prefix if seed == seeds[0] else f"{prefix}_seed{seed}"]
                lines.append(f"| {label} | {seed} | {r['fvu'][0]:.4f} | {np.mean(r['fvu'][-tail:]):.4f} | "
                             f"{r['heldout']['fvu']:.4f} | {r['heldout']['fvu_positions_1_on']:.4f} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, required=True, help="training cache (hooks cache)")
    p.add_argument("--heldout", type=Path, required=True, help="held-out cache of the same hook point")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--point", help="hook point (default: the cache's only one)")
    p.add_argument("--batch", type=int, default=1024, help="tokens per step")
    p.add_argument("--steps", type=int, help="default: the whole cache")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--latents", type=int, default=18432)
    p.add_argument("--lr", type=float, help="default: sparsify's 2e-4 / sqrt(latents / 2^14)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--extra-seeds", type=lambda v: [int(s) for s in v.split(",") if s], default=[],
                   help="comma-separated seeds of more initialisations, each trained by sparsify's trainer "
                        "on the same batches from our init and from its own")
    p.add_argument("--shuffle-buffer", type=int, default=1 << 17, help="as sae train's --shuffle-buffer")
    p.add_argument("--dead-threshold", type=int, default=65536, help="tokens without firing = dead")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((args.cache / "manifest.json").read_text())
    points = manifest["settings"]["hook_points"]
    args.point = args.point or points[0]
    if not re.fullmatch(r"layers\.\d+", args.point) or args.point not in points:
        raise SystemExit(f"--point must be a cached residual point layers.N; the cache has {points}")
    steps = args.steps or manifest["tokens"] // args.batch
    if args.lr is None:
        args.lr = 2e-4 / (args.latents / 2**14) ** 0.5
    settings = {"model": manifest["settings"]["model"], "cache": str(args.cache), "point": args.point,
                "steps": steps, "batch": args.batch, "k": args.k, "latents": args.latents, "lr": args.lr,
                "warmup": args.warmup, "seed": args.seed, "shuffle_buffer": args.shuffle_buffer,
                "dead_threshold": args.dead_threshold}
    settings_file = args.out / "settings.json"
    if settings_file.exists() and json.loads(settings_file.read_text()) != settings:
        raise SystemExit(f"{args.out} holds runs with other settings ({settings_file}); use another --out")
    settings_file.write_text(json.dumps(settings, indent=1))

    print(f"{args.point} of {manifest['settings']['model']}: {steps} steps x {args.batch} tokens, "
          f"{args.latents} latents, k {args.k}, lr {args.lr:.4g}, warm-up {args.warmup}, seed {args.seed}", flush=True)
    rows = shuffled_rows(args.cache, args.point, args.batch, args.seed, args.shuffle_buffer, steps)
    shards = sae_train.load_cache(args.cache, args.point)
    if len(shards) == len(rows):
        fed_is_cache = bool(np.array_equal(row_set(shards), row_set(rows)))
        print(f"check: the fed rows are a permutation of the cache's {len(shards)} rows: {fed_is_cache}")
        assert fed_is_cache, "the reader did not return the cache's rows"
    else:
        fed_is_cache = None
        print(f"check skipped: {len(rows)} of the cache's {len(shards)} rows are used")
    del shards

    ours_history, ours_seconds = run_ours(args, args.out / "ours", steps, args.seed)
    init_out = args.out / "ours-init"
    init_history, _ = run_ours(args, init_out, 1, args.seed)
    assert init_history[0]["lr"] == 0.0, "the first step must have lr 0 (a warm-up) to export the initial weights"
    from safetensors.numpy import load_file

    init = load_file(str(init_out / args.point / "sae.safetensors"))
    first_mean = rows[: args.batch].astype(np.float64).mean(0)
    b_dec_gap = float(np.abs(init["b_dec"] - first_mean).max() / np.abs(first_mean).max())
    print(f"check: our initial b_dec vs the mean of the first fed batch: max |diff| / max |mean| {b_dec_gap:.1e}")
    assert b_dec_gap < 1e-5, "sparsify would not see the batches our trainer saw"

    results = {"settings": {**settings, "extra_seeds": args.extra_seeds, "threads": args.threads},
               "ours": {"impl": "eleuther-interp sae train (f32)", "fvu": [r["fvu"] for r in ours_history],
                        "dead_fraction": [r["dead_fraction"] for r in ours_history], "seconds": ours_seconds,
                        "sae": str(args.out / "ours" / args.point)}}
    results["sparsify_our_init"] = run_sparsify(args, rows, steps, "sparsify-our-init",
                                                init_out / args.point / "sae.safetensors", args.seed)
    results["sparsify_own_init"] = run_sparsify(args, rows, steps, "sparsify-own-init", None, args.seed)
    # The spread of initial draws: sparsify's trainer on the same batches from our
    # initialisation (exported with another seed; only the weights are used, sparsify sets
    # b_dec from the first batch) and from its own (torch seed).
    for seed in args.extra_seeds:
        extra_init = args.out / f"ours-init-seed{seed}"
        run_ours(args, extra_init, 1, seed)
        results[f"sparsify_our_init_seed{seed}"] = run_sparsify(
            args, rows, steps, f"sparsify-our-init-seed{seed}", extra_init / args.point / "sae.safetensors", seed)
        results[f"sparsify_own_init_seed{seed}"] = run_sparsify(
            args, rows, steps, f"sparsify-own-init-seed{seed}", None, seed)
    step1 = (ours_history[0]["fvu"], results["sparsify_our_init"]["fvu"][0])
    print(f"check: step-1 FVU from the same weights and batch: ours {step1[0]:.6f}, sparsify {step1[1]:.6f}")
    results["checks"] = {"fed_rows_are_the_cache": fed_is_cache, "b_dec_vs_first_batch_mean_rel": b_dec_gap,
                         "step1_fvu_ours_vs_sparsify_same_init": list(step1)}

    heldout = sae_train.load_cache(args.heldout, args.point)
    seq_len = json.loads((args.heldout / "manifest.json").read_text())["settings"]["data"]["seq_len"]
    results["heldout_tokens"] = len(heldout)
    for key in [k for k in results if k.startswith(("ours", "sparsify_"))]:
        results[key]["heldout"] = evaluate(results[key]["sae"], heldout, seq_len, args.threads)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    text = table(results, steps)
    (args.out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
