"""Closed-loop throughput: episodes per hour with cameras rendered every step (as OpenVLA-OFT's
stock eval does) vs only at the steps a policy consumes, with 1 vs N worker processes.

Every variant runs libero_object task 0 episodes under the stock protocol (10 wait steps + at most
280 steps, default renderer settings, hard resets) with the dense built-in model and no dense
reference. The committed results were measured with an earlier, untrained built-in model, which
never succeeded, so every episode ran to the limit (the worst case); with the shipped policy an
episode ends early when it succeeds.

* episodes/hour       = episodes / wall time of the whole run (process and env start-up included)
* s/episode           = mean wall time of one episode inside a worker (steady state)
* vs every-step x1    = episodes/hour relative to the first row

Usage: python benchmarks/libero_throughput.py [--episodes 2] [--workers N]
                                             [--out benchmarks/results/libero_throughput.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from prunebench.evaluation.closed_loop import EvalConfig, evaluate
from prunebench.evaluation.results import write_json
from prunebench.evaluation.tables import format_table
from prunebench.evaluation.versions import environment


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=2, help="episodes per worker and variant")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="N for the parallel rows")
    parser.add_argument("--suite", default="libero_object")
    parser.add_argument("--out", default="benchmarks/results/libero_throughput.json")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for render in ("every_step", "query"):
            for workers in (1, args.workers):
                n = args.episodes * workers
                cfg = EvalConfig(strategy="none", suite=args.suite, tasks=[0], episodes=n,
                                 render=render, workers=workers, dense_reference=False)
                r = evaluate(cfg, Path(tmp) / f"{render}_{workers}.json")
                walls = [e.wall_s for e in r.episodes]
                rows.append({"render": render, "workers": workers, "episodes": n,
                             "steps": r.overall.mean_steps, "wall_s": r.eval_s,
                             "episodes_per_hour": r.episodes_per_hour,
                             "s_per_episode": sum(walls) / len(walls),
                             "query_ms": r.overall.queries.latency_ms["total"].median})
                print(f"{render} x{workers}: {r.episodes_per_hour:.0f} episodes/hour", file=sys.stderr)
    base = rows[0]["episodes_per_hour"]
    for row in rows:
        row["vs_first"] = row["episodes_per_hour"] / base
    columns = [("render", "render", ""), ("workers", "workers", "d"), ("episodes", "episodes", "d"),
               ("steps", "steps/ep", ".0f"), ("wall_s", "wall s", ".0f"),
               ("episodes_per_hour", "episodes/hour", ".0f"), ("s_per_episode", "s/episode", ".1f"),
               ("query_ms", "query ms", ".1f"), ("vs_first", "vs every-step x1", ".2f")]
    print(f"{args.suite} task 0, stock protocol, dense built-in model, {os.cpu_count()} CPUs")
    print(format_table(rows, columns))

    from pydantic import BaseModel

    class Throughput(BaseModel):
        command: str
        suite: str
        environment: dict
        rows: list[dict]

    write_json(args.out, Throughput(command=" ".join(["python"] + sys.argv), suite=args.suite,
                                    environment=environment("cpu"), rows=rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
