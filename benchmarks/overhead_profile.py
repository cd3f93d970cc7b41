"""Where a strategy's overhead goes: a cProfile of its queries minus the dense queries'.

Runs the same SyntheticStream queries through the engine dense and with one strategy, each under
cProfile, the two alternating query by query, and prints per query (pruned queries only, as
op_count.py counts them) the extra time by area (engine, contract, strategy plugin, model, C
built-ins, the rest) and the functions whose own time grew most. cProfile slows Python code more
than the C++ kernels it calls, so read shares and rankings, not milliseconds; engine.py is the
timing. Time is this process's CPU time, so another job on the machine disturbs it less than a
wall clock would (but still does).

    python benchmarks/overhead_profile.py random --set keep_ratio=0.5
    python benchmarks/overhead_profile.py specprune-vla --top 20 --shape llm-heavy
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from engine import LLM_HEAVY  # benchmarks/engine.py's LLM-heavy shape: one definition
from op_count import is_counted  # the same queries op_count.py counts

import prunebench
import prunebench.strategies
from prunebench.engine.loop import PruningEngine
from prunebench.evaluation.runner import run_interleaved
from prunebench.evaluation.streams import SyntheticStream
from prunebench.models import load_model
from prunebench.models.mini_oft import MiniOFT
from prunebench.plugins.manager import MANAGER
from prunebench.runtime.inputs import parse_overrides

# where the imported code lives (an editable install maps prunebench.strategies to strategies/)
PACKAGE = Path(prunebench.__file__).resolve().parent
STRATEGIES = Path(prunebench.strategies.__file__).resolve().parent
DENSE_ROW = "dense"


def area(filename: str) -> str:
    """Which part of the stack a profiled function belongs to."""
    if filename == "~":
        return "torch ops and builtins (C)"
    path = Path(filename).resolve()
    if STRATEGIES in path.parents:
        return "strategy plugin"
    for part in ("engine", "contract", "models"):
        if PACKAGE / part in path.parents:
            return f"prunebench/{part}"
    if "torch" in path.parts:
        return "torch (Python)"
    if "transformers" in path.parts:
        return "transformers (Python)"
    return "other Python"


def profile_interleaved(engine: PruningEngine, strategies: dict, stream, warmup: int,
                        seed: int) -> dict[str, tuple[dict, int]]:
    """Per strategy name: own time in s per function summed over its counted queries, and how many
    were counted. The strategies' queries alternate in shuffled order (``run_interleaved``), so a
    change of machine load hits them alike; each one's first ``warmup`` queries are not counted."""
    names = {id(strategy): name for name, strategy in strategies.items()}
    totals: dict[str, list[pstats.Stats]] = {name: [] for name in strategies}
    seen: Counter = Counter()
    query = engine.query

    def profiled(strategy, *args, **kwargs):
        profiler = cProfile.Profile(time.process_time)  # CPU time: less sensitive to other jobs
        profiler.enable()
        result = query(strategy, *args, **kwargs)
        profiler.disable()
        name = names[id(strategy)]
        seen[name] += 1
        if seen[name] > warmup and is_counted(result, dense_run=name == DENSE_ROW):
            totals[name].append(pstats.Stats(profiler))
        return result

    engine.query = profiled
    try:
        run_interleaved(engine, strategies, stream, seed=seed)
    finally:
        del engine.query
    out = {}
    for name, stats in totals.items():
        if not stats:
            raise SystemExit(f"{name}: no pruned query to profile in {len(stream)} queries")
        for more in stats[1:]:
            stats[0].add(more)
        # pstats: {(file, line, function): (primitive calls, calls, own time, cumulative, callers)}
        out[name] = ({key: value[2] for key, value in stats[0].stats.items()}, len(stats))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("strategy")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a strategy config field (JSON value), e.g. keep_ratio=0.5")
    parser.add_argument("--shape", choices=["shipped", "llm-heavy"], default="shipped")
    parser.add_argument("--queries", type=int, default=44)
    parser.add_argument("--warmup", type=int, default=4, help="first queries of each, not counted")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    config = parse_overrides(args.set)
    torch.set_num_threads(1)
    model = MiniOFT.random(LLM_HEAVY, seed=0) if args.shape == "llm-heavy" else load_model()[0]
    engine = PruningEngine(model)
    stream = list(SyntheticStream(n_queries=args.queries, seed=args.seed, image_size=model.cfg.image_size))
    profiles = profile_interleaved(engine, {DENSE_ROW: MANAGER.create("none", {}),
                                            args.strategy: MANAGER.create(args.strategy, config)},
                                   stream, args.warmup, args.seed)
    (dense, n_dense), (pruned, n_pruned) = profiles[DENSE_ROW], profiles[args.strategy]
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
