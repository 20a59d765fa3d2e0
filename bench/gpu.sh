#!/usr/bin/env bash
# The GPU check in two halves: build here, run on a machine with a CUDA GPU.
#
#   bench/gpu.sh build   here: CUDA 13.0 toolkit from PyPI (scripts/cuda-toolkit), release
#                        build with --features cuda (into target/cuda, as scripts/cuda-build) of
#                        the GPU test suites and of the binaries the benchmarks run, stripped
#                        and packed into
#                        target/gpu-carry/ with the wheels of the benchmark's Python peer
#                        (eai-sparsify, which the GPU machine lacks).
#   bench/gpu.sh run [tests|bench]
#                        there, from the repository root with target/gpu-carry carried along:
#                        the GPU tests, then (or only one of) the GPU benchmarks side by side with PyTorch
#                        (bench/forward.py: transformers; bench/sae_train.py: eai-sparsify;
#                        bench/lens_train.py and bench/lens_eval.py: tuned-lens).
#                        Logs go to $OUT (the device tool's folder) or target/gpu-out.
#
# Needs on the GPU machine: a python3 with torch + transformers whose nvidia/cu13 libraries
# (cuBLAS, cuRAND, the CUDA runtime, NVRTC) our binaries load at start-up.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=target/gpu-carry
BUILD=${CARGO_TARGET_DIR:-target}/cuda

# The test executable of target $2 of kind $3 in the CUDA build: `gpu test` (tests/gpu.rs),
# `hooks lib`, `sae lib` or `lens lib` (a crate's unit tests, with its kernel checks). $1 is cargo's JSON artifacts.
test_binary() {
    python3 -c 'import json, sys
name, kind = sys.argv[1:3]
for line in sys.stdin:
    m = json.loads(line)
    if (m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]
            and m["target"]["name"] == name and kind in m["target"]["kind"]):
        print(m["executable"])
        break
else:
    sys.exit(f"no test executable for {kind} target {name} in the build")' "$2" "$3" <<<"$1"
}

build() {
    # The same build as CI's (scripts/cuda-build), then its artifact list (a no-op rebuild).
    scripts/cuda-build
    # shellcheck disable=SC1091
    source target/cuda-toolkit/env.sh
    local artifacts
    artifacts=$(cargo build --release --workspace --all-targets --features cuda --target-dir "$BUILD" \
        --message-format=json)
    rm -rf "$CARRY"
    mkdir -p "$CARRY/bin" "$CARRY/wheels"
    cp "$BUILD"/release/{hooks,sae,lens} "$BUILD/release/examples/forward_bench" "$CARRY/bin/"
    cp "$(test_binary "$artifacts" gpu test)" "$CARRY/bin/gpu-tests"
    cp "$(test_binary "$artifacts" sae lib)" "$CARRY/bin/sae-unit-tests"
    cp "$(test_binary "$artifacts" lens lib)" "$CARRY/bin/lens-unit-tests"
    cp "$(test_binary "$artifacts" hooks lib)" "$CARRY/bin/hooks-unit-tests"
    strip "$CARRY"/bin/*
    # The binaries share most of their bytes (candle's kernels): a dictionary larger than the
    # whole tar lets xz store them once (13.6 MB instead of 49 MB; ~3 minutes).
    tar -C "$CARRY" -cf - bin | xz -T1 --lzma2=preset=6,dict=384MiB >"$CARRY/bin.tar.xz"
    rm -rf "$CARRY/bin"
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$CARRY/wheels" \
        eai-sparsify==1.3.3 simple-parsing==0.1.9 docstring-parser==0.18.0 natsort==8.4.0 tuned-lens==0.2.0
    du -sh "$CARRY"
    echo "carry $CARRY to the GPU machine and run: bench/gpu.sh run"
}

run() {
    local part=${1:-all}
    local out=${OUT:-target/gpu-out}
    mkdir -p "$out" target/gpu-run
    local cu13
    cu13=$(python3 -c 'import nvidia, os; print(os.path.join(os.path.dirname(nvidia.__path__[0]), "nvidia", "cu13", "lib"))')
    export LD_LIBRARY_PATH="$cu13:${LD_LIBRARY_PATH:-}"
    tar -C target/gpu-run -xJf "$CARRY/bin.tar.xz"
    local bin=$PWD/target/gpu-run/bin
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/ei-site "$CARRY"/wheels/*.whl
    export PYTHONPATH=/tmp/ei-site PYTHONUNBUFFERED=1
    nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || true
    local status=0
    if [ "$part" != bench ]; then
        echo "== GPU tests"
        (
            rc=0
            "$bin/sae-unit-tests" --ignored gpu_ || rc=1
            "$bin/lens-unit-tests" --ignored gpu_ || rc=1
            "$bin/hooks-unit-tests" --ignored gpu_ || rc=1
            EI_REPO=$PWD "$bin/gpu-tests" --ignored --test-threads 1 || rc=1
            exit $rc
        ) 2>&1 | tee "$out/gpu-tests.log" || status=1
    fi
    [ "$part" = tests ] && return $status
    echo "== GPU benchmarks"
    (
        rc=0
        for shape in pythia-160m pythia-410m pythia-1b; do
            python3 bench/forward.py --device cuda --prebuilt "$bin" --shape "$shape" --dtype bfloat16 \
                --batch 8 --seq 2048 --iters 5 || rc=1
        done
        echo "== pythia-1b without our fused forward kernels (EI_FLASH_ATTENTION=0 EI_FUSED_ELEMENTWISE=0)"
        EI_FLASH_ATTENTION=0 EI_FUSED_ELEMENTWISE=0 python3 bench/forward.py --device cuda --prebuilt "$bin" --shape pythia-1b \
            --dtype bfloat16 --batch 8 --seq 2048 --iters 5 || rc=1
        python3 bench/sae_train.py --device cuda --prebuilt "$bin" --shape pythia-160m --latents 32768 \
            --k 32 --batch 8192 --steps 20 --warmup 10 || rc=1
        # sparsify's default step: 32 sequences of 2048 tokens (ours in chunks of 16384 tokens).
        python3 bench/sae_train.py --device cuda --prebuilt "$bin" --shape pythia-1b --latents 65536 \
            --k 32 --batch 65536 --chunk-tokens 16384 --steps 3 --warmup 1 || rc=1
        python3 bench/lens_train.py --device cuda --prebuilt "$bin" --shape pythia-160m --seq 2048 --batch 8 \
            --tokens-per-step 16384 --steps 4 --chunk-tokens 4096 || rc=1
        python3 bench/lens_eval.py --device cuda --prebuilt "$bin" --shape pythia-160m --seq 2048 --batch 4 \
            --tokens 131072 --chunk-tokens 4096 || rc=1
        exit $rc
    ) 2>&1 | tee "$out/gpu-bench.log" || status=1
    return $status
}

case "${1:-}" in
build) build ;;
run)
    case "${2:-all}" in
    all | tests | bench) run "${2:-all}" ;;
    *)
        echo "usage: bench/gpu.sh run [tests|bench]" >&2
        exit 2
        ;;
    esac
    ;;
*)
    echo "usage: bench/gpu.sh build|run [tests|bench]" >&2
    exit 2
    ;;
esac
