#!/usr/bin/env bash
# Run on the GPU machine (no registry access needed), from the repository root, with .whl/ from
# gpu_wheels.sh beside it: installs the wheels and prunebench itself offline into /tmp/site, then
# runs the OFT-7B-shaped benchmark, its profile and the gpu-marked tests. Everything lands in $OUT
# (default results/gpu): gpu.txt (nvidia-smi, versions), gpu_oft7b.json and benchmark.log,
# gpu_profile.json and profile.log, pytest_gpu.log. About 3 minutes on an H200.
#   benchmarks/gpu_run.sh                  # all three
#   benchmarks/gpu_run.sh profile tests    # some of: bench profile tests
set -euo pipefail
parts=${*:-bench profile tests}
cd "$(dirname "$0")/.."
out=$(realpath -m "${OUT:-results/gpu}")
mkdir -p "$out"
site=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
# prunebench is installed (not put on PYTHONPATH): the built-in strategies live in strategies/ and
# exist as prunebench.strategies only once installed (pyproject.toml's package-dir)
# (setuptools' deprecation notices go to install.log, shown only if the install fails)
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$site" . \
    2>"$out/install.log" || { cat "$out/install.log"; exit 1; }
# run from a copy of benchmarks/ and tests/, so that the source tree's prunebench/ cannot shadow it
work=$(mktemp -d)
cp -r benchmarks tests pyproject.toml "$work"
cd "$work"
export PYTHONPATH="$site" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import prunebench, torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'prunebench from', prunebench.__file__)" | tee -a "$out/gpu.txt"
if [[ $parts == *bench* ]]; then
    python3 benchmarks/gpu_oft7b.py --rounds "${ROUNDS:-30}" --out "$out/gpu_oft7b.json" 2>&1 | tee "$out/benchmark.log"
fi
if [[ $parts == *profile* ]]; then
    python3 benchmarks/gpu_profile.py ${PROFILE_ARGS:-} --out "$out/gpu_profile.json" 2>&1 | grep -v "^USDT:" | tee "$out/profile.log"
fi
if [[ $parts == *tests* ]]; then
    # the gpu-marked tests live in tests/test_oft.py (the other test modules need the study stack)
    python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_oft.py 2>&1 | tee "$out/pytest_gpu.log"
fi
