#!/usr/bin/env bash
# Run on a machine WITH package-registry access, before a GPU run: downloads into .whl/ the wheels
# that the GPU benchmark and `pytest -m gpu` need beyond what a stock GPU image holds (PyTorch,
# transformers, numpy, safetensors, pluggy, PyYAML, pytest are expected there; pydantic is not).
# The versions are those installed in this environment, so both machines run the same pydantic.
#   benchmarks/gpu_wheels.sh            # then carry .whl/ to the GPU machine, run gpu_run.sh there
# PY_VERSION (default 3.12) must match the GPU machine's python3.
set -euo pipefail
cd "$(dirname "$0")/.."
py_version=${PY_VERSION:-3.12}
pins=$(python3 - <<'PY'
import importlib.metadata as md
print(" ".join(f"{n}=={md.version(n)}" for n in
               ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions")))
PY
)
rm -rf .whl && mkdir .whl
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py_version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $pins
ls -1 .whl
