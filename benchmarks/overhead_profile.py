"""Where a strategy's overhead goes: a cProfile of its queries minus the dense queries'.

Runs the same SyntheticStream queries through the engine dense and with one strategy, each under
cProfile, and prints per query (pruned queries only, as op_count.py counts them) the extra time
by area (engine, contract, strategy plugin, model, torch ops, the rest) and the functions whose
own time grew most. cProfile slows Python code more than the C++ kernels it calls, so read shares
and rankings, not milliseconds; engine.py is the timing. Time is this process's CPU time, so
another job on the machine slows it less than a wall clock.

    python benchmarks/overhead_profile.py random --set keep_ratio=0.5
    python benchmarks/overhead_profile.py specprune-vla --top 20 --shape llm-heavy
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from prunebench.engine.loop import PruningEngine
from prunebench.evaluation.runner import run_stream
from prunebench.evaluation.streams import SyntheticStream
from prunebench.models import load_model
from prunebench.models.mini_oft import MiniOFT
from prunebench.plugins.manager import MANAGER
from prunebench.runtime.inputs import parse_overrides

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import LLM_HEAVY  # noqa: E402  (engine.py's LLM-heavy shape: one definition)

REPO = Path(__file__).resolve().parents[1]


def area(filename: str) -> str:
    """Which part of the stack a profiled function belongs to."""
    if filename == "~":
        return "torch ops and builtins (C)"
    path = Path(filename).resolve()
    if REPO / "strategies" in path.parents:
        return "strategy plugin"
    for part in ("engine", "contract", "models"):
        if REPO / "prunebench" / part in path.parents:
            return f"prunebench/{part}"
    if "torch" in path.parts:
        return "torch (Python)"
    if "transformers" in path.parts:
        return "transformers (Python)"
    return "other Python"


def profile(engine: PruningEngine, name: str, config: dict, stream, seed: int) -> tuple[dict, int]:
    """Own time in s per function summed over the counted queries, and how many were counted."""
    totals: list[pstats.Stats] = []
    query = engine.query

    def profiled(*args, **kwargs):
        profiler = cProfile.Profile(time.process_time)  # CPU time: robust to other jobs
        profiler.enable()
        result = query(*args, **kwargs)
        profiler.disable()
        # a dense warm-up or a first query without an earlier frame is not counted
        if name == "none" or not result.record.dense and result.record.stages:
            totals.append(pstats.Stats(profiler))
        return result

    engine.query = profiled
    try:
        run_stream(engine, MANAGER.create(name, config), stream, seed=seed)
    finally:
        del engine.query
    if not totals:
        raise SystemExit(f"{name}: no pruned query to profile in {len(stream)} queries")
    merged = totals[0]
    for stats in totals[1:]:
        merged.add(stats)
    # pstats: {(file, line, function): (primitive calls, calls, own time, cumulative, callers)}
    return {key: value[2] for key, value in merged.stats.items()}, len(totals)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("strategy")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a strategy config field (JSON value), e.g. keep_ratio=0.5")
    parser.add_argument("--shape", choices=["shipped", "llm-heavy"], default="shipped")
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    config = parse_overrides(args.set)
    torch.set_num_threads(1)
    model = MiniOFT.random(LLM_HEAVY, seed=0) if args.shape == "llm-heavy" else load_model()[0]
    engine = PruningEngine(model)
    stream = list(SyntheticStream(n_queries=args.queries, seed=args.seed, image_size=model.cfg.image_size))
    run_stream(engine, MANAGER.create("none", {}), stream[:4], seed=args.seed)  # warm-up
    dense, n_dense = profile(engine, "none", {}, stream, args.seed)
    pruned, n_pruned = profile(engine, args.strategy, config, stream, args.seed)
    extra = {key: pruned.get(key, 0.0) / n_pruned - dense.get(key, 0.0) / n_dense for key in {*dense, *pruned}}
    dense_ms, pruned_ms = 1e3 * sum(dense.values()) / n_dense, 1e3 * sum(pruned.values()) / n_pruned
    print(f"{args.strategy} {config or '(paper defaults)'}, {args.shape} model, 1 thread, under cProfile: "
          f"dense {dense_ms:.2f} ms/query ({n_dense} queries), pruned {pruned_ms:.2f} ms/query "
          f"({n_pruned} counted)")
    by_area: dict[str, float] = defaultdict(float)
    for (filename, _, _), seconds in extra.items():
        by_area[area(filename)] += seconds
    print("\nextra own time per query by area (negative: the pruned query does less there)")
    for name, seconds in sorted(by_area.items(), key=lambda item: -item[1]):
        print(f"  {1e3 * seconds:+8.3f} ms  {name}")
    print(f"\nthe {args.top} functions whose own time per query grew most")
    for (filename, line, func), seconds in sorted(extra.items(), key=lambda item: -item[1])[:args.top]:
        where = func if filename == "~" else f"{func} ({Path(filename).name}:{line})"
        print(f"  {1e3 * seconds:+8.3f} ms  {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
