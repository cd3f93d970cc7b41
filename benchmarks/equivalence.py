"""Behaviour check for engine and strategy refactors: same kept tokens, same actions.

Runs every built-in strategy (at its paper defaults, at keep ratios 0.25 / 0.5 where it has one,
and a few variants that exercise other code paths: row groups, ablations, the releases' quirk
flags) on the shipped policy over a fixed synthetic stream, and writes the kept visual indices of
every stage and the actions of every query to JSON. Run it before and after a change, then
compare:

    python benchmarks/equivalence.py -o /tmp/equiv_before.json      # before the change
    python benchmarks/equivalence.py -o /tmp/equiv_after.json       # after
    python benchmarks/equivalence.py --compare /tmp/equiv_before.json /tmp/equiv_after.json

With ``--closed-loop`` it also plays one LIBERO episode per built-in strategy (paper default, the
shipped policy, stock protocol, libero_object task 0 from init state 0) and records the kept indices
of every query, every executed action and the outcome, so a refactor is checked in closed loop too
(needs the libero extra; about 4 minutes on 2 cores).

``--results A B`` compares two results files of the same command (e.g. ``prunebench compare
--queries 6 --threads 1 -o A``) without what may differ between runs: timings, speedups,
contention, the environment block and the command line; plugin module names are compared after
mapping the pre-0.2 ``strategies.*`` names onto ``prunebench.strategies.*``.

The comparison prints one row per variant (closed-loop rows start with ``episode``) and exits 1
unless every kept-index list is identical, every action equal within ``--atol`` (1e-6) and every
outcome the same. A variant only in the second file (a strategy the change adds) is listed as new
and not compared; one only in the first is missing, a failure. One torch thread, so runs are deterministic.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import numpy as np
import torch

from prunebench.engine.loop import PruningEngine
from prunebench.evaluation.runner import run_stream
from prunebench.evaluation.streams import SyntheticStream
from prunebench.evaluation.tables import format_table
from prunebench.models import load_model
from prunebench.plugins.manager import MANAGER

KEEP_RATIOS = (0.25, 0.5)
# (label, config) beyond the paper default and the keep ratios: paths a refactor might break
EXTRA = {
    "fastv": [("rows=prefill", {"rows": "prefill"}), ("global top-k", {"per_view": False}),
              ("rows=text after 0", {"rows": "text", "layer": 0})],
    "random": [("after layer 1", {"after_layer": 1}), ("global", {"per_view": False})],
    "downsample": [("after layer 2", {"after_layer": 2, "keep_ratio": 0.3})],
    "adp": [("gate off", {"gate": False}), ("gate off 0.25", {"gate": False, "keep_ratio": 0.25}),
            ("gate off 0.5", {"gate": False, "keep_ratio": 0.5})],
    "vla-pruner": [("no diversity", {"diversity": False}), ("semantic", {"mode": "semantic"}),
                   ("action", {"mode": "action"}), ("current action", {"current_action_attention": True}),
                   ("rows=last", {"rows": "last"}),
                   ("release decay", {"release_oldest_weighted_most": True})],
    "specprune-vla": [("static", {"dynamic": False}), ("dynamic", {"static": False}),
                      ("no global", {"use_global": False}), ("global 0,1", {"global_layers": (0, 1)}),
                      ("no controller", {"controller": False}),
                      ("release bugs", {"release_layer1_index_bug": True, "release_ema_index_bug": True})],
}


def variants() -> dict[str, tuple[str, dict]]:
    out = {"none": ("none", {})}
    for name in MANAGER.builtin_strategies():
        out[f"{name} paper"] = (name, {})
        if "keep_ratio" in MANAGER.get(name).Config.model_fields:
            for keep in KEEP_RATIOS:
                out[f"{name} {keep}"] = (name, {"keep_ratio": keep})
        for label, config in EXTRA.get(name, []):
            out[f"{name} {label}"] = (name, config)
    return out


def run(n_queries: int, seed: int) -> dict:
    torch.set_num_threads(1)
    model, info = load_model()
    engine = PruningEngine(model, record_kept=True)
    stream = list(SyntheticStream(n_queries=n_queries, seed=seed, image_size=model.cfg.image_size))
    out = {"model": info.get("source"), "n_queries": n_queries, "seed": seed, "variants": {}}
    for label, (name, config) in variants().items():
        results = run_stream(engine, MANAGER.create(name, config), stream, seed=seed)
        out["variants"][label] = {
            "strategy": name, "config": config,
            "queries": [{"kept": {s.where + (f":{s.name}" if s.name else ""): s.kept
                                  for s in r.record.stages},
                         "actions": r.actions.tolist()} for r in results]}
        print(f"{label}: {len(results)} queries", file=sys.stderr)
    return out


def _recording_steps(make_env, executed: list):
    """``make_env`` whose envs append every executed action to ``executed``."""
    def make(job):
        env = make_env(job)
        step = env.step

        def recorded_step(action):
            executed.append([float(a) for a in action])
            return step(action)
        env.step = recorded_step
        return env
    return make


def run_closed_loop(seed: int, max_steps: int | None) -> dict:
    """One closed-loop episode per strategy: kept indices per query, executed actions, outcome."""
    from prunebench.evaluation.closed_loop import EvalConfig
    from prunebench.evaluation.episode import EpisodeRunner, Job

    out = {}
    for name in ["none", *MANAGER.builtin_strategies()]:
        cfg = EvalConfig(strategy=name, seed=seed, tasks=[0], threads=1, dense_reference=False,
                         max_steps=max_steps)
        executed: list[list[float]] = []
        runner = EpisodeRunner(cfg)
        runner._make_env = _recording_steps(runner._make_env, executed)  # the runner's own LIBERO env
        runner.engine.record_kept = True
        try:
            episode = runner.run(Job(cfg.suite, 0, 0, 0))
        finally:
            runner.close()
        if episode.error:
            raise RuntimeError(f"{name}: the episode raised: {episode.error}")
        out[f"episode {name}"] = {
            "strategy": name, "config": {}, "success": episode.success, "steps": episode.steps,
            "queries": [{"kept": {s.where + (f":{s.name}" if s.name else ""): s.kept for s in q.stages},
                         # chunks of 8: exact unless a re-query cut one short; "executed" holds them all
                         "actions": executed[i * 8:(i + 1) * 8]} for i, q in enumerate(episode.queries)],
            "executed": executed}
        print(f"episode {name}: success={episode.success} steps={episode.steps}", file=sys.stderr)
    return out


def compare(before: dict, after: dict, atol: float) -> int:
    rows, ok, new = [], True, 0
    for label in sorted(set(before["variants"]) | set(after["variants"])):
        a, b = before["variants"].get(label), after["variants"].get(label)
        if a is None:  # a strategy or variant added by the change: nothing to compare it with
            rows.append({"variant": label, "queries": len(b["queries"]), "stages": 0, "kept": "new",
                         "max_action_diff": float("nan"), "ok": "-"})
            new += 1
            continue
        if b is None:  # a variant the change lost
            rows.append({"variant": label, "queries": 0, "stages": 0, "kept": "missing",
                         "max_action_diff": float("nan"), "ok": "NO"})
            ok = False
            continue
        stages = same = 0
        diff = 0.0
        for qa, qb in zip(a["queries"], b["queries"]):
            stages += max(len(qa["kept"]), len(qb["kept"]))
            same += sum(qa["kept"].get(k) == v for k, v in qb["kept"].items())
            diff = max(diff, float(np.abs(np.array(qa["actions"]) - np.array(qb["actions"])).max(initial=0.0)))
        good = (len(a["queries"]) == len(b["queries"]) and same == stages and diff <= atol
                and a.get("success") == b.get("success") and a.get("executed") == b.get("executed"))
        ok &= good
        rows.append({"variant": label, "queries": len(b["queries"]), "stages": stages,
                     "kept": f"{same}/{stages}", "max_action_diff": diff, "ok": "yes" if good else "NO"})
    print(format_table(rows, [("variant", "variant", ""), ("queries", "queries", ""),
                              ("kept", "same kept", ""), ("max_action_diff", "max |Δaction|", ".2e"),
                              ("ok", "ok", "")]))
    print(("all equivalent" if ok else "DIFFERENCES FOUND") + (f" ({new} new variants not compared)" if new else ""))
    return 0 if ok else 1


TIMING = re.compile(r"(^|_)(ms|s|speedup|speedups|contended|contention|load|cpu|wall|time|started|"
                    r"finished|environment|command|git_hash|threads|overhead)(_|$)")


def _without_timings(value, key=""):
    if isinstance(value, dict):
        return {k: _without_timings(v, k) for k, v in value.items() if not TIMING.search(k)}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    if key == "plugin" and isinstance(value, str) and value.startswith("strategies."):
        return "prunebench." + value
    return value


def compare_results(path_a: str, path_b: str) -> int:
    """Two results files, equal once run-dependent fields are dropped: the differing paths, or ok."""
    a, b = (_without_timings(json.loads(open(p).read())) for p in (path_a, path_b))
    differences: list[str] = []

    def walk(x, y, where):
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{where}.{k}")
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{where}[{i}]")
        elif x != y:
            differences.append(f"{where}: {x!r} != {y!r}")
    walk(a, b, "")
    for line in differences[:40]:
        print(line)
    print("results equal (timings aside)" if not differences else f"{len(differences)} DIFFERENCES")
    return 0 if not differences else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", help="write kept indices and actions to this JSON file")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two files")
    parser.add_argument("--results", nargs=2, metavar=("A", "B"),
                        help="compare two results files of one command, timings aside")
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--atol", type=float, default=1e-6)
    parser.add_argument("--closed-loop", action="store_true",
                        help="also one LIBERO episode per strategy (needs the libero extra)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="cap each closed-loop episode (default: the suite's stock limit)")
    args = parser.parse_args(argv)
    if args.results:
        return compare_results(*args.results)
    if args.compare:
        before, after = (json.loads(open(p).read()) for p in args.compare)
        return compare(before, after, args.atol)
    if not args.out:
        parser.error("give -o OUT (run) or --compare BEFORE AFTER")
    data = run(args.queries, args.seed)
    if args.closed_loop:
        data["variants"].update(run_closed_loop(args.seed, args.max_steps))
    with open(args.out, "w") as f:
        json.dump(data, f)
    print(f"wrote {args.out} ({len(data['variants'])} variants)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
