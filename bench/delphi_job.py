#!/usr/bin/env python3
"""Delphi-style explain + score jobs: eleuther-interp (`delphi run`) against PyPI eai-delphi,
both talking to the same loopback OpenAI-compatible server (bench/delphi_server.py) that
answers every request after a fixed latency, so the LLM is not the variable.

Part `job` (throughput). A tiny synthetic GPT-NeoX (d 32) runs over WikiText-2; an SAE
trained by our `sae train` (4096 latents, k 32) is cached by our `delphi cache`; that cache is
rewritten into delphi's own layout (latents/<hookpoint>/<start>_<end>.safetensors, 5 splits,
u16 locations, f16 activations, int64 tokens) and BOTH tools read that same folder. Same
latents, same example settings (32-token windows, at least 200 activating windows, 40
explainer examples from 10 quantiles, 50 + 50 scoring examples, 5 per prompt: 1 + 20 + 20
requests per latent), detection and fuzzing. Concurrency: delphi's Pipeline runs C latents at
once and each latent has at most 2 requests in flight (its two scorers run side by side, each
one prompt at a time), so at most 2C requests are in flight; ours runs with
`--concurrency C --max-requests 2C`, the same ceiling. The floor of a run is
(requests / 2C) x latency. Timed: our `run_job` (its printed rate) and delphi's `Pipeline.run`;
both include reading the latents' firings from the split files, neither includes process
start-up (torch import, model load); whole-process wall times are printed too.

Part `cache` (memory of the latent cache). `delphi cache` over pre-tokenized WikiText-2
(tiled) with a 32768-latent SAE (k 32) on the same tiny model: peak RSS, time, size on disk.
The peer is delphi's own `LatentCache` (its `InMemoryCache` keeps every nonzero in RAM until
the end) driven with the same model in transformers and the same SAE loaded by eai-sparsify,
then `save_splits` as its CLI does; measured at a smaller token count and compared with its
layout's arithmetic (its dense [batch x ctx x latents] buffers make it far too slow on
2 CPU cores for 1e7 tokens: ~400 tokens/s here). Our run at 1e7 tokens would take ~30-40
min on 2 busy cores, so the default token counts stop at 1e6 and 1e7 is extrapolated
linearly (the script prints the probe's estimate first).

Setup once: `bash bench/delphi_setup.sh` (makes /work/venv-delphi). Then:

    /work/venv-delphi/bin/python bench/delphi_job.py [--part job|cache|all] [--latents 200]
        [--concurrency 8,32] [--repeats 3] [--latency-ms 100] [--cache-tokens 262144,1000000]
        [--peer-cache-tokens 65536,262144]
"""
import argparse
import asyncio
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "target" / "bench" / "delphi"
TOKENIZER = REPO / "data" / "gpt-neox-20b-tokenizer.json"
WIKITEXT = REPO / "data" / "wikitext-2-raw-test.txt"
HOOKPOINT = "layers.1"
MODEL_CONFIG = {
    "model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"], "hidden_size": 32,
    "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128, "rotary_pct": 0.5,
    "vocab_size": 50304, "eos_token_id": 0, "bos_token_id": 0, "max_position_embeddings": 2048,
    "use_parallel_residual": True, "layer_norm_eps": 1e-5, "hidden_act": "gelu",
    "tie_word_embeddings": False,
}
SEQ_LEN = 256
EXAMPLES = dict(example_ctx_len=32, min_examples=200, n_train=40, n_test=50, n_non_activating=50,
                n_quantiles=10, per_prompt=5)


def run(cmd, **kw):
    """Runs a command, failing loudly with its output."""
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if result.returncode != 0:
        sys.exit(f"command failed ({result.returncode}): {' '.join(map(str, cmd))}\n{result.stdout}\n{result.stderr}")
    return result


def timed(cmd, **kw):
    """Runs a command under /usr/bin/time; returns (result, peak RSS MiB, wall seconds, CPU
    seconds (user + system))."""
    result = run(["/usr/bin/time", "-f", "BENCH_TIME %M %e %U %S"] + list(cmd), **kw)
    m = re.findall(r"BENCH_TIME (\d+) ([\d.]+) ([\d.]+) ([\d.]+)", result.stderr)[-1]
    return result, int(m[0]) / 1024, float(m[1]), float(m[2]) + float(m[3])


def build():
    run(["nice", "cargo", "build", "--release", "-q", "-p", "eleuther-delphi", "--bin", "delphi",
         "-p", "eleuther-sae", "--bin", "sae", "-p", "eleuther-hooks", "--example", "forward_bench"], cwd=REPO)


def model_dir():
    path = BENCH / "tiny-neox"
    if not (path / "model.safetensors").exists():
        path.mkdir(parents=True, exist_ok=True)
        (path / "bench-config.json").write_text(json.dumps(MODEL_CONFIG))
        run([REPO / "target/release/examples/forward_bench", path, "--synthesize", path / "bench-config.json"])
    shutil.copy(TOKENIZER, path / "tokenizer.json")
    return path


def tokens_file(min_tokens):
    """WikiText-2 tokenised once (uint16 .npy), tiled to at least `min_tokens` tokens."""
    from tokenizers import Tokenizer

    path = BENCH / f"wikitext-tiled-{min_tokens}.npy"
    if not path.exists():
        tok = Tokenizer.from_file(str(TOKENIZER))
        docs = [line for line in WIKITEXT.read_text().splitlines() if line.strip()]
        ids = []
        for enc in tok.encode_batch(docs):
            ids.extend(enc.ids)
            ids.append(0)  # EOS between documents, as our text reader joins them
        base = np.array(ids, dtype=np.uint16)
        reps = -(-min_tokens // len(base))
        np.save(path, np.tile(base, reps))
    return path


def train_sae(model, latents, steps, out):
    if not (out / HOOKPOINT / "sae.safetensors").exists():
        run([REPO / "target/release/sae", "train", "--model", model, "--data", WIKITEXT, "--seq-len", SEQ_LEN,
             "--hookpoints", HOOKPOINT, "--num-latents", latents, "--k", 32, "--batch-size", 4096,
             "--steps", steps, "--lr-warmup-steps", max(1, steps // 10), "--output", out],
            env=dict(os.environ, RAYON_NUM_THREADS="2"))
    return out


def our_cache(model, sae, data, tokens, out, extra=()):
    """`delphi cache`; returns (peak RSS MiB, wall s)."""
    shutil.rmtree(out, ignore_errors=True)
    _, rss, wall, _ = timed([REPO / "target/release/delphi", "cache", "--model", model, "--sae", sae, "--hookpoints",
                          HOOKPOINT, "--data", data, "--seq-len", SEQ_LEN, "--max-tokens", tokens, "--output", out,
                          *extra])
    return rss, wall


def read_our_cache(cache):
    from safetensors.numpy import load_file

    tokens, locations, values = [], [], []
    for path in sorted(glob.glob(str(cache / "shards" / "*.safetensors")), key=lambda p: int(Path(p).stem.split("_")[0])):
        data = load_file(path)
        tokens.append(data["tokens"])
        # Sequences are counted from the shard's first (its file name's start).
        loc = data[f"{HOOKPOINT}.locations"].astype(np.int64)
        loc[:, 0] += int(Path(path).stem.split("_")[0])
        locations.append(loc)
        values.append(data[f"{HOOKPOINT}.activations"])
    return np.concatenate(tokens), np.concatenate(locations), np.concatenate(values)


def to_delphi_layout(cache, out, width, n_splits=5):
    """Rewrites our cache as delphi's LatentCache.save_splits would have written it."""
    import torch
    from safetensors.numpy import save_file

    tokens, locations, values = read_our_cache(cache)
    shutil.rmtree(out, ignore_errors=True)
    module = out / HOOKPOINT
    module.mkdir(parents=True)
    bounds = torch.linspace(0, width, steps=n_splits + 1).long().tolist()
    for start, end in zip(bounds[:-1], [b - 1 for b in bounds[1:]]):
        mask = (locations[:, 2] >= start) & (locations[:, 2] <= end)
        loc = locations[mask].astype(np.int64)
        loc[:, 2] -= start
        small = loc[:, 2].max(initial=0) < 2**16 and loc[:, 0].max(initial=0) < 2**16
        save_file({"locations": loc.astype(np.uint16 if small else np.uint32),
                   "activations": values[mask].astype(np.float16),
                   "tokens": tokens.astype(np.int64)}, str(module / f"{start}_{end}.safetensors"))
    (module / "config.json").write_text(json.dumps({
        "dataset_repo": str(WIKITEXT), "dataset_split": "test", "dataset_name": "", "dataset_column": "text",
        "batch_size": 8, "cache_ctx_len": SEQ_LEN, "n_tokens": int(tokens.size), "n_splits": n_splits,
        "model_name": "tiny-neox (synthetic)"}))
    return tokens, locations


def windows_per_latent(tokens, locations, latents):
    """Activating 32-token windows of each latent in `latents` (delphi's and our criterion)."""
    windows_per_seq = tokens.shape[1] // EXAMPLES["example_ctx_len"]
    wins = locations[:, 0].astype(np.int64) * windows_per_seq + locations[:, 1] // EXAMPLES["example_ctx_len"]
    counts = []
    for latent in latents:
        counts.append(len(np.unique(wins[locations[:, 2] == latent])))
    return counts


class Server:
    def __init__(self, latency_ms):
        self.proc = subprocess.Popen([sys.executable, str(REPO / "bench/delphi_server.py"), "--latency-ms",
                                      str(latency_ms)], stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        self.url = line.strip().removeprefix("listening on ")
        if not self.url.startswith("http"):
            sys.exit(f"server did not start: {line}")

    def call(self, route, method="GET"):
        req = urllib.request.Request(self.url + route, method=method, data=b"" if method == "POST" else None)
        with urllib.request.urlopen(req) as r:
            return json.loads(r.read())

    def close(self):
        self.proc.terminate()
        self.proc.wait()


def count_outputs(out, pattern_expl, pattern_score):
    expl = len(glob.glob(str(out / "explanations" / pattern_expl)))
    det = len(glob.glob(str(out / "scores" / "detection" / pattern_score)))
    fuzz = len(glob.glob(str(out / "scores" / "fuzz" / pattern_score)))
    return expl, det, fuzz


def ours_job(server, model, sae, latents_dir, n_latents, concurrency, out):
    shutil.rmtree(out, ignore_errors=True)
    server.call("/reset", "POST")
    e = EXAMPLES
    result, rss, wall, cpu = timed([
        REPO / "target/release/delphi", "run", "--model", model, "--sae", sae, "--hookpoints", HOOKPOINT,
        "--latent-cache", latents_dir, "--latents", f"0..{n_latents}", "--explainer", server.url,
        "--scorers", "detection,fuzzing", "--output", out, "--concurrency", concurrency,
        "--max-requests", 2 * concurrency, "--example-ctx-len", e["example_ctx_len"],
        "--min-examples", e["min_examples"], "--n-train", e["n_train"], "--n-test", e["n_test"],
        "--n-non-activating", e["n_non_activating"], "--n-quantiles", e["n_quantiles"],
        "--examples-per-prompt", e["per_prompt"]])
    stats = server.call("/stats")
    m = re.search(r"(\d+) latents in this shard, (\d+) complete.*?([\d.]+) latents/min", result.stdout)
    in_shard, rate = int(m.group(1)), float(m.group(3))
    job_s = in_shard / rate * 60
    expl, det, fuzz = count_outputs(out, f"{HOOKPOINT}_latent*.txt", f"{HOOKPOINT}_latent*.txt")
    # The whole process's CPU time: start-up (model and cache loading) is a few tens of ms here.
    return dict(tool="eleuther-interp", job_s=job_s, wall_s=wall, cpu_s=cpu, job_cpu_s=cpu, rss_mib=rss, explained=expl,
                scored=min(det, fuzz), stats=stats)


def theirs_job(server, latents_dir, n_latents, concurrency, out):
    shutil.rmtree(out, ignore_errors=True)
    server.call("/reset", "POST")
    result, rss, wall, cpu = timed([sys.executable, __file__, "--peer-job", "--url", server.url, "--latents-dir",
                               latents_dir, "--latents", n_latents, "--concurrency", concurrency, "--out", out])
    peer = json.loads(result.stdout.strip().splitlines()[-1])
    stats = server.call("/stats")
    expl, det, fuzz = count_outputs(out, "*.txt", "*.txt")
    return dict(tool=f"eai-delphi {peer['version']}", job_s=peer["seconds"], wall_s=wall, cpu_s=cpu,
                job_cpu_s=peer["job_cpu_s"], rss_mib=rss,
                explained=expl, scored=min(det, fuzz), stats=stats)


def import_delphi():
    """Imports delphi without its `delphi.clients` package __init__ (which imports vllm for the
    in-process Offline client, not used here: the benchmark talks HTTP)."""
    import types

    import delphi

    clients = types.ModuleType("delphi.clients")
    clients.__path__ = [os.path.join(delphi.__path__[0], "clients")]
    sys.modules["delphi.clients"] = clients
    return delphi


def peer_job(args):
    """eai-delphi's pipeline as its CLI's process_cache builds it, over the given cache."""
    import importlib.metadata
    from functools import partial

    import orjson
    import torch
    from transformers import PreTrainedTokenizerFast

    import_delphi()
    from delphi.clients.openrouter import OpenRouter
    from delphi.config import ConstructorConfig, SamplerConfig
    from delphi.explainers import DefaultExplainer
    from delphi.latents import LatentDataset
    from delphi.pipeline import Pipe, Pipeline, process_wrapper
    from delphi.scorers import DetectionScorer, FuzzingScorer

    e = EXAMPLES
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER))
    dataset = LatentDataset(
        raw_dir=args.latents_dir,
        sampler_cfg=SamplerConfig(n_examples_train=e["n_train"], n_examples_test=e["n_test"],
                                  n_quantiles=e["n_quantiles"], train_type="quantiles", test_type="quantiles"),
        constructor_cfg=ConstructorConfig(example_ctx_len=e["example_ctx_len"], min_examples=e["min_examples"],
                                          n_non_activating=e["n_non_activating"], non_activating_source="random"),
        modules=[HOOKPOINT], latents={HOOKPOINT: torch.arange(args.latents)}, tokenizer=tokenizer)
    client = OpenRouter("bench", api_key="unused", base_url=args.url + "/chat/completions")
    out = Path(args.out)
    (out / "explanations").mkdir(parents=True, exist_ok=True)

    def explainer_postprocess(result):
        with open(out / "explanations" / f"{result.record.latent}.txt", "wb") as f:
            f.write(orjson.dumps(result.explanation))
        return result

    def scorer_preprocess(result):
        if isinstance(result, list):
            result = result[0]
        record = result.record
        record.explanation = result.explanation
        record.extra_examples = record.not_active
        return record

    def scorer_postprocess(result, score_dir):
        with open(score_dir / f"{str(result.record.latent).replace('/', '--')}.txt", "wb") as f:
            f.write(orjson.dumps(result.score))

    scorers = []
    for name, cls in [("fuzz", FuzzingScorer), ("detection", DetectionScorer)]:
        (out / "scores" / name).mkdir(parents=True, exist_ok=True)
        scorer = cls(client, n_examples_shown=e["per_prompt"], verbose=False, log_prob=False)
        scorers.append(process_wrapper(scorer, preprocess=scorer_preprocess,
                                       postprocess=partial(scorer_postprocess, score_dir=out / "scores" / name)))
    pipeline = Pipeline(dataset, Pipe(process_wrapper(DefaultExplainer(client, threshold=0.3, verbose=False),
                                                      postprocess=explainer_postprocess)), Pipe(*scorers))
    start, cpu_start = time.perf_counter(), cpu_seconds()
    asyncio.run(pipeline.run(args.concurrency))
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "job_cpu_s": cpu_seconds() - cpu_start,
                      "version": importlib.metadata.version("eai-delphi")}))


def cpu_seconds():
    """CPU time of this process so far, all threads, user + system."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def import_sparsify():
    """eai-sparsify's SparseCoder without its package __init__ (which needs `datasets`), also
    as `sparsify.SparseCoder`, where delphi looks for it."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import sae_train

    SparseCoder, SparseCoderConfig, _ = sae_train.import_sparsify("cpu")
    pkg = sys.modules["sparsify"]
    pkg.SparseCoder, pkg.SparseCoderConfig = SparseCoder, SparseCoderConfig
    return SparseCoder


def peer_cache(args):
    """delphi's LatentCache (InMemoryCache) over the same tokens with the same model and SAE,
    then save_splits as its CLI does; prints the nonzeros it held."""
    from functools import partial

    import psutil
    import torch
    from transformers import GPTNeoXForCausalLM

    torch.set_num_threads(2)
    SparseCoder = import_sparsify()
    import_delphi()
    from delphi.latents import LatentCache
    from delphi.sparse_coders.load_sparsify import sae_dense_latents

    model = GPTNeoXForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    sae = SparseCoder.load_from_disk(Path(args.sae) / HOOKPOINT, device="cpu")
    tokens = np.load(args.data)[: args.tokens].astype(np.int64).reshape(-1, SEQ_LEN)
    cache = LatentCache(model, {f"gpt_neox.{HOOKPOINT}": partial(sae_dense_latents, sae=sae)}, batch_size=32)
    start = time.perf_counter()
    cache.run(args.tokens, torch.from_numpy(tokens))
    rss_after_run = psutil.Process().memory_info().rss / 2**20
    cache.save_splits(n_splits=5, save_dir=Path(args.out))
    mem = cache.cache
    nonzeros = sum(int(t.shape[0]) for t in mem.latent_activations.values())
    dtypes = {k: (str(v.dtype), str(mem.latent_activations[k].dtype)) for k, v in mem.latent_locations.items()}
    # What InMemoryCache holds once run() has finished: the per-batch lists and their
    # concatenation (both stay referenced), locations, activations and tokens.
    held = sum(t.nbytes for store in (mem.latent_locations_batches, mem.latent_activations_batches,
                                      mem.tokens_batches) for ts in store.values() for t in ts)
    held += sum(t.nbytes for store in (mem.latent_locations, mem.latent_activations, mem.tokens)
                for t in store.values())
    print(json.dumps({"seconds": time.perf_counter() - start, "nonzeros": nonzeros, "dtypes": dtypes,
                      "held_bytes": held, "rss_after_run_mib": rss_after_run}))


def part_job(args):
    model = model_dir()
    sae = train_sae(model, 4096, 60, BENCH / "sae-4096")
    cache = BENCH / "cache-4096"
    if not (cache / "config.json").exists() or '"complete": true' not in (cache / "config.json").read_text():
        our_cache(model, sae, WIKITEXT, args.job_tokens, cache)
    latents_dir = BENCH / "latents-delphi-layout"
    tokens, locations = to_delphi_layout(cache, latents_dir, 4096)
    tokens = tokens.reshape(-1, SEQ_LEN)
    counts = windows_per_latent(tokens, locations, range(args.latents))
    eligible = sum(c >= EXAMPLES["min_examples"] for c in counts)
    print(f"cache: {tokens.size} tokens, {len(locations)} nonzeros; latents 0..{args.latents}: {eligible} fire in "
          f">= {EXAMPLES['min_examples']} windows (min {min(counts)}, median {int(np.median(counts))})")
    server = Server(args.latency_ms)
    latency = args.latency_ms / 1000
    rows = []
    try:
        for c in args.concurrency:
            runs = {"ours": [], "theirs": []}
            for rep in range(args.repeats):  # interleaved, so both see the same machine load
                for side, job in (("ours", lambda: ours_job(server, model, sae, latents_dir, args.latents, c,
                                                            BENCH / "out-ours")),
                                  ("theirs", lambda: theirs_job(server, latents_dir, args.latents, c,
                                                                BENCH / "out-theirs"))):
                    r = job()
                    r["concurrency"], r["repeat"] = c, rep
                    r["floor_s"] = r["stats"]["requests"] / (2 * c) * latency
                    r["per_min"] = r["scored"] / r["job_s"] * 60
                    runs[side].append(r)
                    rows.append(r)
                    s = r["stats"]
                    print(f"C={c:3d} (<= {2 * c} requests in flight) {r['tool']:18s}: {r['per_min']:7.1f} latents/min "
                          f"({r['explained']} explained, {r['scored']} scored by both; job {r['job_s']:.1f} s, whole "
                          f"process {r['wall_s']:.1f} s; CPU {r['job_cpu_s']:.1f} s in the job, {r['cpu_s']:.1f} s in "
                          f"all); {s['requests']} requests "
                          f"({s['explainer']} explainer), floor {r['floor_s']:.1f} s -> job/floor "
                          f"{r['job_s'] / r['floor_s']:.2f}; mean in flight {s['mean_in_flight']:.1f}, peak "
                          f"{s['peak_in_flight']}; peak RSS {r['rss_mib']:.0f} MiB", flush=True)
            med = {side: sorted(rs, key=lambda r: r["job_s"])[len(rs) // 2] for side, rs in runs.items()}
            for side in ("ours", "theirs"):
                r = med[side]
                print(f"C={c:3d} median of {args.repeats} {r['tool']:18s}: {r['per_min']:7.1f} latents/min, job/floor "
                      f"{r['job_s'] / r['floor_s']:.2f}, CPU {r['job_cpu_s'] / r['scored']:.3f} s per latent, mean in "
                      f"flight {r['stats']['mean_in_flight']:.1f}, peak RSS {r['rss_mib']:.0f} MiB", flush=True)
            print(f"C={c:3d} ratio ours/theirs (latents/min, medians): "
                  f"{med['ours']['per_min'] / med['theirs']['per_min']:.2f}", flush=True)
    finally:
        server.close()
    (BENCH / "job-results.json").write_text(json.dumps(rows, indent=1))


def part_cache(args):
    model = model_dir()
    data = tokens_file(max(args.cache_tokens + args.peer_cache_tokens))
    sae = train_sae(model, 32768, 1, BENCH / "sae-32768")
    target = 10_000_000
    # A small run first to estimate the time of a 1e7-token one.
    probe = 65536
    rss, wall = our_cache(model, sae, data, probe, BENCH / "cache-32k-probe")
    shutil.rmtree(BENCH / "cache-32k-probe", ignore_errors=True)
    print(f"ours, probe: {probe} tokens x 32768 latents in {wall:.1f} s (peak RSS {rss:.0f} MiB): "
          f"{target:.0e} tokens would take ~{wall * target / probe / 60:.0f} min", flush=True)
    ours = []
    for tokens in args.cache_tokens:
        out = BENCH / f"cache-32k-{tokens}"
        rss, wall = our_cache(model, sae, data, tokens, out)
        disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        _, locations, _ = read_our_cache(out)
        shutil.rmtree(out)
        ours.append((tokens, rss, wall, disk, len(locations)))
        print(f"ours  : {tokens:>9} tokens: {wall:7.1f} s ({tokens / wall:.0f} tokens/s), peak RSS {rss:6.0f} MiB, "
              f"{len(locations)} nonzeros, on disk {disk / 2**20:.0f} MiB ({disk / len(locations):.1f} B per "
              f"nonzero incl. tokens)", flush=True)
    theirs = []
    for tokens in args.peer_cache_tokens:
        out = BENCH / f"delphi-cache-32k-{tokens}"
        shutil.rmtree(out, ignore_errors=True)
        result, rss, wall, _ = timed([sys.executable, __file__, "--peer-cache", "--model", model, "--sae", sae,
                                   "--data", data, "--tokens", tokens, "--out", out])
        peer = json.loads(result.stdout.strip().splitlines()[-1])
        disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        shutil.rmtree(out)
        theirs.append((tokens, rss, peer["seconds"], disk, peer["nonzeros"], peer["held_bytes"]))
        print(f"delphi: {tokens:>9} tokens: {peer['seconds']:7.1f} s ({tokens / peer['seconds']:.0f} tokens/s), peak "
              f"RSS {rss:6.0f} MiB, {peer['nonzeros']} nonzeros held as {peer['dtypes']}; InMemoryCache holds "
              f"{peer['held_bytes'] / 2**20:.0f} MiB after run() ({peer['held_bytes'] / peer['nonzeros']:.1f} B per "
              f"nonzero; RSS then {peer['rss_after_run_mib']:.0f} MiB); on disk {disk / 2**20:.0f} MiB", flush=True)
    # Extrapolation to 1e7 tokens.
    per_token = ours[-1][4] / ours[-1][0]
    nonzeros = per_token * target
    t, rss_t, _, disk_t, n_t, held_t = theirs[-1]
    held_per_nonzero = held_t / n_t
    print(f"at {target:.0e} tokens x 32768 latents ({per_token:.1f} nonzeros per token, {nonzeros:.3g} nonzeros):")
    print(f"  ours  : peak RSS {max(r[1] for r in ours):.0f} MiB measured up to {ours[-1][0]} tokens (one shard is "
          f"held at a time); on disk ~{ours[-1][3] / ours[-1][0] * target / 2**30:.2f} GiB; time "
          f"~{ours[-1][2] / ours[-1][0] * target / 60:.0f} min (linear)")
    print(f"  delphi: InMemoryCache holds ~{held_per_nonzero * nonzeros / 2**30:.1f} GiB after run() "
          f"({held_per_nonzero:.1f} B per nonzero) on top of the process's other memory; on disk "
          f"~{disk_t / t * target / 2**30:.2f} GiB; time ~{theirs[-1][2] / t * target / 3600:.1f} h (linear)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["job", "cache", "all"], default="all")
    p.add_argument("--latents", type=int, default=200, help="latents 0..N explained and scored")
    p.add_argument("--concurrency", default="8,32", help="latents in flight (comma separated list)")
    p.add_argument("--latency-ms", type=float, default=100.0)
    p.add_argument("--repeats", type=int, default=3, help="runs per tool and concurrency (medians reported)")
    p.add_argument("--job-tokens", type=int, default=262144, help="tokens in the job's latent cache")
    p.add_argument("--cache-tokens", default="262144,1000000", help="token counts of our 32k-latent cache runs")
    p.add_argument("--peer-cache-tokens", default="65536,262144", help="token counts of delphi's cache runs")
    p.add_argument("--no-build", action="store_true")
    for hidden in ["--peer-job", "--peer-cache"]:
        p.add_argument(hidden, action="store_true", help=argparse.SUPPRESS)
    for hidden in ["--url", "--latents-dir", "--out", "--model", "--sae", "--data"]:
        p.add_argument(hidden, help=argparse.SUPPRESS)
    p.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.peer_job:
        args.concurrency = int(args.concurrency)
        return peer_job(args)
    if args.peer_cache:
        return peer_cache(args)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.cache_tokens = [int(float(t)) for t in args.cache_tokens.split(",")]
    args.peer_cache_tokens = [int(float(t)) for t in args.peer_cache_tokens.split(",")]
    if not args.no_build:
        build()
    BENCH.mkdir(parents=True, exist_ok=True)
    if args.part in ("job", "all"):
        part_job(args)
    if args.part in ("cache", "all"):
        part_cache(args)


if __name__ == "__main__":
    main()
