#!/usr/bin/env bash
# Makes the Python environment that bench/delphi_job.py drives PyPI eai-delphi from.
#
# eai-delphi pins vllm (a GPU inference engine, several GB) which the benchmark never uses:
# it talks to an OpenAI-compatible HTTP server through delphi's OpenRouter client. So the
# package goes in with --no-deps, plus only what the modules the benchmark imports need;
# torch, transformers, sentence-transformers and eai-sparsify come from the reference venv
# (a .pth file puts its site-packages on the path), except transformers: delphi 0.1.3 decodes
# each example with `tokenizer.batch_decode(ids)` expecting one string per token, which
# transformers 5 turned into one string per sequence (the whole window), so it gets 4.x here.
# eai-sparsify (also --no-deps) supplies the SAE encoder for delphi's own latent cache.
#
#   bash bench/delphi_setup.sh [VENV=/work/venv-delphi] [REF_VENV=/work/venv-ref]
set -euo pipefail
venv=${1:-/work/venv-delphi}
ref=${2:-/work/venv-ref}
base=$("$ref/bin/python" -c 'import sys; print(sys._base_executable)')
"$base" -m venv "$venv"
site=$("$venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')
ref_site=$("$ref/bin/python" -c 'import site; print(site.getsitepackages()[0])')
echo "$ref_site" > "$site/reference-venv.pth"
"$venv/bin/pip" install -q --no-deps eai-delphi==0.1.3 eai-sparsify==1.3.3
"$venv/bin/pip" install -q orjson jaxtyping blobfile aiofiles asyncer beartype simple_parsing faiss-cpu psutil tqdm httpx tiktoken "transformers>=4.50,<5"
"$venv/bin/python" -c 'import delphi, importlib.metadata as m; print("eai-delphi", m.version("eai-delphi"))'
