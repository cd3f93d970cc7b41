"""Operation counts of the pruning overhead: aten calls per query, minus the dense query's.

On the shipped policy most of a strategy's overhead is the dispatch cost of many small tensor ops
(a few µs each), so the number of ops is a machine-independent proxy for it. Counts every aten
call the engine, the model and the strategy issue during ``PruningEngine.query`` (a
``TorchDispatchMode``), over a few SyntheticStream queries, per built-in strategy at its paper
default and at keep 0.5; only pruned queries are counted (VLA-Pruner's dense warm-up and
SpecPrune-VLA's first query, which has no earlier frame, are not).

    python benchmarks/op_count.py                 # table
    python benchmarks/op_count.py --top 15        # and the most frequent ops per variant
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from prunebench.engine.loop import PruningEngine
from prunebench.evaluation.runner import run_stream
from prunebench.evaluation.streams import SyntheticStream
from prunebench.evaluation.tables import format_table
from prunebench.models import load_model
from prunebench.plugins.manager import MANAGER


class OpCounter(TorchDispatchMode):
    """Counts aten calls by name while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def is_counted(result, dense_run: bool) -> bool:
    """Whether a query counts toward a strategy's overhead: every query of the dense run, otherwise
    pruned queries only (not VLA-Pruner's dense warm-up nor SpecPrune-VLA's first query, which has
    no earlier frame)."""
    return dense_run or not result.record.dense and bool(result.record.stages)


def count(engine: PruningEngine, name: str, config: dict, stream, seed: int) -> tuple[float, Counter, int]:
    """Mean aten calls per counted query, the summed op counter, and how many queries counted."""
    per_query: list[Counter] = []
    query = engine.query

    def counted(*args, **kwargs):
        with OpCounter() as counter:
            result = query(*args, **kwargs)
        if is_counted(result, dense_run=name == "none"):
            per_query.append(counter.ops)
        return result

    engine.query = counted
    try:
        run_stream(engine, MANAGER.create(name, config), stream, seed=seed)
    finally:
        del engine.query
    total = sum(per_query, Counter())
    n = max(1, len(per_query))
    return sum(total.values()) / n, total, len(per_query)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top", type=int, default=0, help="also print the N most frequent extra ops")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, _ = load_model()
    engine = PruningEngine(model)
    stream = list(SyntheticStream(n_queries=args.queries, seed=args.seed, image_size=model.cfg.image_size))
    dense, dense_ops, n_dense = count(engine, "none", {}, stream, args.seed)
    rows = [{"variant": "none (dense)", "queries": n_dense, "ops": dense, "extra": 0.0}]
    for name in MANAGER.builtin_strategies():
        configs = [("paper", {})]
        if "keep_ratio" in MANAGER.get(name).Config.model_fields:
            configs.append(("0.5", {"keep_ratio": 0.5}))
        if name == "adp":  # the gate skips pruning on most synthetic queries
            configs += [("gate off", {"gate": False}), ("gate off 0.5", {"gate": False, "keep_ratio": 0.5})]
        for label, config in configs:
            ops, total, n = count(engine, name, config, stream, args.seed)
            rows.append({"variant": f"{name} {label}", "queries": n, "ops": ops, "extra": ops - dense})
            if args.top:
                extra = Counter({op: c / max(1, n) - dense_ops.get(op, 0) / n_dense for op, c in total.items()})
                print(f"{name} {label}: " + ", ".join(f"{op} {c:+.1f}" for op, c in extra.most_common(args.top)),
                      file=sys.stderr)
    print(format_table(rows, [("variant", "variant", ""), ("queries", "queries counted", ""),
                              ("ops", "aten ops / query", ".1f"), ("extra", "minus dense", ".1f")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
