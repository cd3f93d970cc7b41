"""Behaviour check for changes to ``prunebench/models/mini_oft.py`` that must not change what an
existing model computes: every shipped weights file and a random default-config model predict
action chunks for the same seeded observations (each suite's instructions), once with another
checkout's copy of the package (before) and once with this one (after); the chunks must be equal
bit for bit::

    git clone -q . /tmp/before   # at the commit before the change
    python benchmarks/model_outputs_compare.py /tmp/before
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

SUITES = ("libero_object", "libero_spatial", "libero_goal")


def predictions() -> dict[str, list]:
    """{model name: [chunk, ...]} of the package on sys.path (run in a subprocess per checkout)."""
    import torch

    from prunebench.contract.strategy import Observation
    from prunebench.evaluation.libero_env import tasks
    from prunebench.models.builtin import builtin_weights, shipped_suites
    from prunebench.models.mini_oft import MiniOFT, MiniOFTConfig

    torch.set_num_threads(1)
    models = {f"shipped {s}": MiniOFT.load(builtin_weights(s))
              for s in shipped_suites()}
    models["random default config"] = MiniOFT.random(seed=3)
    # the instruction paths start at zero (a no-op); give them weights so that they are compared too
    for label, paths in (("FiLM", {"film": True}), ("FiLM+slots", {"film": True, "instruction_slots": True})):
        model = MiniOFT.random(MiniOFTConfig(**paths), seed=3)
        gen = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            # only the instruction paths' projections (the LLM's q/k/v/o and MLP projections keep
            # their initialisation)
            if name.endswith("proj.weight") and (".film." in name or name.startswith("slot_conditioning.")):
                p.data = torch.randn(p.shape, generator=gen) * 0.5
        models[f"random {label} config"] = model
    rng = np.random.default_rng(0)
    out = {}
    for name, model in models.items():
        chunks = []
        for suite in SUITES:
            for task in tasks(suite):
                images = {v: rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for v in model.cfg.views}
                obs = Observation(images=images, proprio=rng.normal(size=8).astype(np.float32),
                                  instruction=task.instruction)
                chunks.append(model.predict(obs).numpy().tolist())
        out[name] = chunks
    return out


def main() -> int:
    if sys.argv[1:2] == ["--emit"]:
        print(json.dumps(predictions()))
        return 0
    runs = {}
    for label, root in (("before", Path(sys.argv[1]).resolve()), ("after", Path(__file__).parents[1])):
        text = subprocess.run([sys.executable, __file__, "--emit"], env={**os.environ, "PYTHONPATH": str(root)},
                              capture_output=True, text=True, check=True).stdout
        runs[label] = json.loads(text)
    same = runs["before"].keys() == runs["after"].keys()
    for name in runs["after"]:
        equal = name in runs["before"] and np.array_equal(runs["before"][name], runs["after"][name])
        same &= equal
        print(f"{name:28s} {len(runs['after'][name])} chunks  {'identical' if equal else 'DIFFERENT'}")
    print("identical" if same else "DIFFERENT")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
