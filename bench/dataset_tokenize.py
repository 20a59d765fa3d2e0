#!/usr/bin/env python3
"""Tokenizing a dataset once: `hooks tokenize` vs the Python way, side by side in one run, on
the same text (WikiText-2's test split repeated `--repeat` times, one document per non-empty
line) and the same packing (each document preceded by EOS, cut into `--seq-len` sequences,
the last partial one dropped, as sparsify's `chunk_and_tokenize` and tuned-lens do).

The peer is what those libraries do under `datasets.map`: Hugging Face `tokenizers` (the
Rust library behind every fast tokenizer) encoding the documents in batches with
`encode_batch`, then numpy packing the ids and `np.save` writing them. Both sides get the
same threads (`RAYON_NUM_THREADS`), run in their own process (peak RSS of each), and must
write identical arrays.

    /work/venv-ref/bin/python bench/dataset_tokenize.py [--repeat 20] [--seq-len 2048] [--threads 2]
        [--rounds 3]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "data" / "gpt-neox-20b-tokenizer.json"
WIKITEXT = REPO / "data" / "wikitext-2-raw-test.txt"
BATCH_DOCS = 1000  # documents per encode_batch call, as datasets.map(batched=True) passes them


def peer(args):
    from tokenizers import Tokenizer

    start = time.perf_counter()
    tokenizer = Tokenizer.from_file(str(TOKENIZER))
    eos = tokenizer.token_to_id("<|endoftext|>")
    with open(args.data, encoding="utf-8") as f:
        docs = [line.rstrip("\r\n") for line in f if line.strip()]
    pieces = []
    for i in range(0, len(docs), BATCH_DOCS):
        for encoding in tokenizer.encode_batch(docs[i:i + BATCH_DOCS], add_special_tokens=False):
            pieces.append(np.array([eos, *encoding.ids], dtype=np.uint16))
    ids = np.concatenate(pieces)
    rows = len(ids) // args.seq_len
    np.save(args.output, ids[:rows * args.seq_len].reshape(rows, args.seq_len))
    print(json.dumps({"seconds": time.perf_counter() - start,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def child(cmd, env):
    """Runs `cmd`, returning its wall time and its own peak RSS (from wait4)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{err}")
    return {"seconds": time.perf_counter() - start, "peak_rss_mib": usage.ru_maxrss / 1024, "stdout": out}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=20, help="copies of WikiText-2's test split (1.3 MB each)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="alternating runs of each; medians reported")
    p.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.peer:
        return peer(args)

    subprocess.run(["cargo", "build", "--release", "-q", "-p", "eleuther-hooks", "--bin", "hooks"], cwd=REPO,
                   check=True)
    bench = REPO / "target" / "bench"
    bench.mkdir(parents=True, exist_ok=True)
    data = bench / f"wikitext-x{args.repeat}.txt"
    if not data.exists():
        data.write_text(WIKITEXT.read_text(encoding="utf-8") * args.repeat, encoding="utf-8")
    ours_out, theirs_out = bench / "tokenize-ours.npy", bench / "tokenize-theirs.npy"
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="true")
    ours_cmd = [str(REPO / "target/release/hooks"), "tokenize", "--tokenizer", str(TOKENIZER), "--data", str(data),
                "--seq-len", str(args.seq_len), "--output", str(ours_out), "--overwrite"]
    theirs_cmd = [sys.executable, __file__, "--peer", "--data", str(data), "--seq-len", str(args.seq_len),
                  "--output", str(theirs_out)]
    rounds = [(child(ours_cmd, env), child(theirs_cmd, env)) for _ in range(args.rounds)]
    ours_ids, theirs_ids = np.load(ours_out), np.load(theirs_out)
    if ours_ids.shape != theirs_ids.shape or not np.array_equal(ours_ids, theirs_ids):
        sys.exit(f"the two arrays differ: {ours_ids.shape} vs {theirs_ids.shape}")
    tokens = ours_ids.size

    def median(side, key):
        return sorted(r[side][key] for r in rounds)[len(rounds) // 2]

    ratios = sorted(t["seconds"] / o["seconds"] for o, t in rounds)
    print(f"tokenize {data.stat().st_size / 1e6:.1f} MB of text ({tokens} tokens kept, {ours_ids.shape[0]} "
          f"sequences of {args.seq_len}), {args.threads} threads, {args.rounds} rounds")
    for name, side in [("eleuther-interp hooks tokenize", 0), ("tokenizers encode_batch + numpy", 1)]:
        seconds = median(side, "seconds")
        print(f"  {name}: {tokens / seconds:10.0f} tokens/s  ({seconds:.2f} s whole process)  "
              f"peak RSS {median(side, 'peak_rss_mib'):.0f} MiB")
    print(f"  ratio ours/theirs (throughput): {ratios[len(ratios) // 2]:.2f} "
          f"(rounds {', '.join(f'{r:.2f}' for r in ratios)}); outputs identical")


if __name__ == "__main__":
    main()
