"""Record (or compare) the scripted expert's actions, to prove an expert refactor changes nothing.

    python benchmarks/expert_trace.py -o before.npz --suite libero_object --seeds 2
    ... change prunebench/training/expert.py ...
    python benchmarks/expert_trace.py -o after.npz --suite libero_object --seeds 2
    python benchmarks/expert_trace.py --compare before.npz after.npz

Each (task, seed) plays the expert without noise from the initial state LIBERO samples from the
demos' env seed (``task * 100000 + offset + k``; never an official init state) and records every
intended action and the outcome; the per-task success table it prints is how docs/policy.md
measures each expert:

    python benchmarks/expert_trace.py -o spatial.npz --suite libero_spatial --seeds 20 --seed-offset 50000
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def record(suite: str, task_ids: list[int] | None, seeds: int, offset: int,
           max_steps: int | None) -> dict[str, np.ndarray]:
    from prunebench.contract.errors import PrunebenchError
    from prunebench.evaluation.libero_env import WAIT_ACTION, WAIT_STEPS, LiberoEnv, stock_max_steps, tasks
    from prunebench.training.demos import SEEDS_PER_TASK
    from prunebench.training.expert import make_expert
    from prunebench.training.fixture_expert import goal_expert

    out = {}
    for task in tasks(suite):
        if task_ids is not None and task.task_id not in task_ids:
            continue
        env = LiberoEnv(suite, task.task_id, render_quality="fast", hard_reset=True)  # as the demos
        solved = 0
        for k in range(seeds):
            env.reset_sampled(task.task_id * SEEDS_PER_TASK + offset + k)
            for _ in range(WAIT_STEPS):
                env.step(WAIT_ACTION)
            try:
                expert, actions, success = goal_expert(env) or make_expert(env), [], False
            except PrunebenchError as err:  # a task no expert handles yet: said, not counted as played
                print(f"task {task.task_id}: no expert ({err})", flush=True)
                break
            for _ in range(max_steps or stock_max_steps(suite)):
                actions.append(expert.act())
                if env.step(actions[-1]).success:
                    success = True
                    break
            key = f"task{task.task_id:02d}_seed{k}"
            out[key] = np.asarray(actions)
            out[key + "_success"] = np.asarray(success)
            print(f"{key}: {'success' if success else 'failure'} in {len(actions)} steps", flush=True)
            solved += success
        else:
            print(f"task {task.task_id}: {solved}/{seeds}  {task.instruction}", flush=True)
        env.close()
    return out


def compare(a: str, b: str) -> int:
    before, after = np.load(a), np.load(b)
    differ = 0
    for key in sorted(set(before.files) | set(after.files)):
        if key not in before.files or key not in after.files:
            print(f"{key}: only in {'after' if key in after.files else 'before'}")
            continue
        same = before[key].shape == after[key].shape and np.array_equal(before[key], after[key])
        differ += not same
        if not same and not key.endswith("_success"):
            print(f"{key}: DIFFERS ({before[key].shape} vs {after[key].shape} actions)")
        elif not same:
            print(f"{key}: outcome {bool(before[key])} -> {bool(after[key])}")
    print("all identical" if not differ else f"{differ} entries differ")
    return 0 if not differ else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", help="write the actions here (.npz)")
    parser.add_argument("--suite", default="libero_object")
    parser.add_argument("--tasks", type=int, nargs="*")
    parser.add_argument("--seeds", type=int, default=2, help="sampled initial states per task")
    parser.add_argument("--seed-offset", type=int, default=0, help="first k of the env seeds")
    parser.add_argument("--max-steps", type=int, help="default: the suite's stock limit")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    if not args.output:
        parser.error("-o is required unless --compare is given")
    np.savez(args.output, **record(args.suite, args.tasks, args.seeds, args.seed_offset, args.max_steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
