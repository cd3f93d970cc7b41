#!/usr/bin/env bash
# Run on the GPU machine (no registry access needed), from the repository root, with .whl/ from
# gpu_wheels.sh beside it: installs the wheels and prunebench itself offline into /tmp/site, then
# runs the OFT-7B-shaped benchmark and the gpu-marked tests. Everything lands in $OUT (default
# results/gpu): gpu.txt (nvidia-smi, versions), gpu_oft7b.json and benchmark.log, pytest_gpu.log.
# About 3-5 minutes on an H100.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${OUT:-results/gpu}")
mkdir -p "$out"
site=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
# prunebench is installed (not put on PYTHONPATH): the built-in strategies live in strategies/ and
# exist as prunebench.strategies only once installed (pyproject.toml's package-dir)
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$site" .
# run from a copy of benchmarks/ and tests/, so that the source tree's prunebench/ cannot shadow it
work=$(mktemp -d)
cp -r benchmarks tests pyproject.toml "$work"
cd "$work"
export PYTHONPATH="$site" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import prunebench, torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'prunebench from', prunebench.__file__)" | tee -a "$out/gpu.txt"
python3 benchmarks/gpu_oft7b.py --rounds "${ROUNDS:-30}" --out "$out/gpu_oft7b.json" 2>&1 | tee "$out/benchmark.log"
# the gpu-marked tests live in tests/test_oft.py (the other test modules need the study stack)
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_oft.py 2>&1 | tee "$out/pytest_gpu.log"
