#!/usr/bin/env bash
# Regenerates the figures of docs/lens-trajectories.md (CPU only, offline after the first
# SmolLM2 download): trains a small Pythia-architecture series on WikiText-2 with Pythia's
# checkpoint schedule, sweeps tuned and logit lenses across its checkpoints, and draws the
# prediction trajectories of SmolLM2-135M. Everything goes under runs/ (not in git), then the
# page's figures are copied into docs/images/; every step resumes where it stopped when run again.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -p eleuther-lens --bin lens --example train_pythia_series
cargo build --release -p eleuther-hooks --bin hooks

# 1. The series: runs/pythia-tiny/step{0,1,2,4,...,512,1000}/ (hub layout), train.txt, heldout.txt.
target/release/examples/train_pythia_series --output runs/pythia-tiny --steps 1000

# 2. Across checkpoints: a tuned lens per checkpoint (20 steps of 512 tokens on train.txt),
#    both lenses evaluated on the same 2048 held-out tokens, one prompt's trajectories.
target/release/lens sweep -m runs/pythia-tiny --checkpoints step0,step8,step64,step256,step1000 \
    --lens tuned --train-data runs/pythia-tiny/train.txt --data runs/pythia-tiny/heldout.txt \
    --seq-len 64 --batch-size 8 --tokens 2048 --train-steps 20 --tokens-per-step 512 \
    --prompt "The album was released in the United States in 1998 , and the band" \
    --statistic ce,kl,entropy,rank -o runs/sweep-pythia-tiny

# 3. SmolLM2-135M (one revision): the logit lens's trajectory of a prompt and its per-layer eval.
GGUF=$(target/release/hooks fetch smollm2)
target/release/lens plot trajectory -m "$GGUF" \
    --text "The capital of France is Paris. The capital of Germany is" \
    --statistic all -o runs/smollm2-figs/trajectory.png --both-formats \
    --json runs/smollm2-figs/trajectory.json --csv runs/smollm2-figs/trajectory.csv
target/release/lens sweep -m "$GGUF" --checkpoints main --lens logit \
    --data runs/pythia-tiny/heldout.txt --seq-len 128 --batch-size 2 --tokens 512 \
    --prompt "The capital of France is Paris. The capital of Germany is" \
    --statistic ce,kl,entropy -o runs/sweep-smollm2

# 4. Two lenses on one checkpoint: the sweep's tuned lens at step1000 minus the logit lens.
target/release/lens plot trajectory -m runs/pythia-tiny --revision step1000 \
    --lens runs/sweep-pythia-tiny/step1000/lens --minus logit --statistic kl \
    --text "The album was released in the United States in 1998 , and the band" \
    -o runs/pythia-tiny-figs/tuned-minus-logit.png

# 5. The figures the page shows, copied under the names it uses (the trajectories with three
#    checkpoints side by side, to fit the page).
target/release/lens plot sweep runs/sweep-pythia-tiny --figures runs/sweep-pythia-tiny/figures-3 \
    --statistic rank --max-panels 3
cp runs/sweep-pythia-tiny/figures-3/trajectories-tuned-rank.png \
    docs/images/lens-pythia-tiny-trajectories-tuned-rank.png
for figure in curves-logit-ce curves-tuned-kl heatmap-logit-kl heatmap-tuned-kl; do
    cp "runs/sweep-pythia-tiny/figures/$figure.png" "docs/images/lens-pythia-tiny-$figure.png"
done
cp runs/pythia-tiny-figs/tuned-minus-logit.png docs/images/lens-pythia-tiny-tuned-minus-logit-kl.png
cp runs/sweep-smollm2/figures/curves-logit-kl.png docs/images/lens-smollm2-curves-logit-kl.png
for statistic in entropy rank; do
    cp "runs/smollm2-figs/trajectory-$statistic.png" "docs/images/lens-smollm2-trajectory-$statistic.png"
done
