"""Behaviour check for refactors of ``prunebench/training/grasp_choice.py``: the obstacle arrays and
the chosen grasps of another checkout's copy (before) and this one (after) on the same sampled
scenes of three suites must be identical (needs the libero extra)::

    git clone -q . /tmp/before   # at the commit before the change
    python benchmarks/grasp_choice_compare.py /tmp/before
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np

SCENES = [("libero_goal", 3, "akita_black_bowl_1"), ("libero_spatial", 4, "akita_black_bowl_1"),
          ("libero_object", 1, "cream_cheese_1")]


def main() -> int:
    from prunebench.evaluation.libero_env import LiberoEnv
    from prunebench.training import grasp_choice as after

    spec = importlib.util.spec_from_file_location("before_grasp_choice",
                                                  f"{sys.argv[1]}/prunebench/training/grasp_choice.py")
    before = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = before  # dataclasses look their module up
    spec.loader.exec_module(before)
    for suite, task, obj in SCENES:
        env = LiberoEnv(suite, task, render_quality="fast", hard_reset=True)
        env.reset_sampled(77)
        a, b = after.Obstacles(env, obj), before.Obstacles(env, obj)
        same = all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("rot", "centre", "half", "top"))
        model = env.sim.model._model
        geoms = [g for g in range(model.ngeom) if model.geom_contype[g]
                 and model.body(model.geom_bodyid[g]).name.startswith(obj)]
        for hollow in (False, True):  # two copies of the Grasp class: compared by their exact reprs
            same &= repr(after.choose_grasp(env, obj, geoms, 0.95, 0.97, 1.0, hollow)) == repr(
                before.choose_grasp(env, obj, geoms, 0.95, 0.97, 1.0, hollow))
        env.close()
        print(f"{suite}: {'identical' if same else 'DIFFERENT'} obstacles and grasps", flush=True)
        if not same:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
