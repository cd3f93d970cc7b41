"""Is the cheap proxy any good? Rank correlation of replay action error with closed-loop success.

A study can rank configs by the replay metric (action error vs dense on recorded streams: seconds per
config) instead of closed-loop success (minutes per config). That is only worth it if the two rank
configs alike. This script measures it on the shipped policy:

1. the dense policy plays every episode of the plan in closed loop, recording each episode's stream
   (with 5 frames of history, which SpecPrune-VLA needs);
2. every config (built-in strategies x keep ratios, see CONFIGS) plays the same episodes in closed
   loop (success), and is replayed on the recorded streams (action error vs dense);
3. Spearman's rho and Kendall's tau between action error and success over the configs, with a
   bootstrap interval over configs, and the same for the success *drop* vs dense.

    python benchmarks/proxy_correlation.py -o results/proxy            # ~1 h on 2 cores
    python benchmarks/proxy_correlation.py -o results/proxy --report   # the table from what is done

Long: every finished config's results file is kept in ``-o``, and a rerun with the same plan goes on
from there (an interrupted config is rerun whole). A different plan in the same folder is refused,
and so is a second run while one holds the folder; ``--report`` only reads, so it may run beside.
Timing is not measured here (no dense reference in closed loop), so other work may run beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import stats

from prunebench.evaluation.closed_loop import EvalConfig, evaluate
from prunebench.evaluation.results import read_eval_results, write_json, write_text
from prunebench.evaluation.tables import format_table

KEEP_RATIOS = (0.05, 0.1, 0.25, 0.5)
RATIO_STRATEGIES = ("random", "downsample", "fastv", "vla-pruner", "adp")
# SpecPrune-VLA has no single keep ratio: its paper default and two tighter attention budgets
SPECPRUNE = [("default", {}), ("attn_keep/2", {"attn_keep": (0.03125, 0.0234375)}),
             ("static only", {"dynamic": False})]
CONFIGS = [(f"{s} keep {r:g}", s, {"keep_ratio": r}) for s in RATIO_STRATEGIES for r in KEEP_RATIOS] + \
          [(f"specprune-vla {label}", "specprune-vla", cfg) for label, cfg in SPECPRUNE]
HISTORY = 5


def slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in label)


def plan(args) -> dict:
    return {"suite": args.suite, "tasks": args.tasks, "episodes": args.episodes, "seed": args.seed,
            "render_quality": args.render_quality, "hard_reset": not args.fast_reset,
            "configs": [[label, name, cfg] for label, name, cfg in CONFIGS]}


def lock_folder(out: Path):
    """Hold ``out`` for this run (released when the process ends, however it ends): a second run
    into the same folder would write the same results files."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(f"{out}: another proxy_correlation run is using this folder (--report reads it meanwhile)")
    return handle


def open_folder(out: Path, wanted: dict) -> None:
    """A new folder, or one holding this very plan (resume); anything else is refused."""
    plan_file = out / "plan.json"
    if plan_file.exists():
        if json.loads(plan_file.read_text()) != json.loads(json.dumps(wanted)):
            sys.exit(f"{plan_file}: holds a different plan; use another -o")
        return
    if out.exists() and any(p.name != ".lock" for p in out.iterdir()):
        sys.exit(f"{out}: not empty and holds no plan.json; use another -o")
    write_text(plan_file, json.dumps(wanted, indent=2))


def closed_loop(args, out: Path, label: str, name: str, config: dict, record: bool) -> dict:
    path = out / "closed_loop" / f"{slug(label)}.json"
    if path.exists() and read_eval_results(path).complete:
        results = read_eval_results(path)
    else:
        cfg = EvalConfig(strategy=name, config=config, seed=args.seed, suite=args.suite, tasks=args.tasks,
                         episodes=args.episodes, workers=args.workers, threads=args.threads,
                         render_quality=args.render_quality, hard_reset=not args.fast_reset,
                         dense_reference=False, record_dir=str(out / "streams") if record else None,
                         record_history=HISTORY if record else 0)
        print(f"closed loop: {label} ...", file=sys.stderr, flush=True)
        results = evaluate(cfg, path, " ".join(sys.argv))
    o = results.overall
    return {"success_rate": o.success_rate, "n_episodes": o.n_episodes, "n_errors": o.n_errors,
            "success_ci95": list(o.success_ci95),
            "outcomes": {f"{e.task_id}/{e.init_state_id}": e.success for e in results.episodes if not e.error}}


def replayed(args, out: Path, label: str, name: str, config: dict, engine) -> float:
    from prunebench.evaluation.replay import RecordedStream, replay, stream_files
    from prunebench.plugins.manager import MANAGER

    path = out / "replay" / f"{slug(label)}.json"
    if path.exists():
        return json.loads(path.read_text())["action_error"]["mean"]
    streams = [RecordedStream(p) for p in stream_files([out / "streams"])]
    report = replay(engine, MANAGER.create(name, config), streams, seed=args.seed, name=name)
    write_json(path, report)
    return report.action_error.mean


def correlations(rows: list[dict], seed: int = 0, n_resamples: int = 2000) -> dict:
    """Spearman and Kendall of action error vs success over configs, with bootstrap intervals."""
    error = np.array([r["action_error"] for r in rows])
    success = np.array([r["success_rate"] for r in rows])
    out = {"n_configs": len(rows)}
    for key, fn in (("spearman", stats.spearmanr), ("kendall", stats.kendalltau)):
        value, p = fn(error, success)
        rng = np.random.default_rng(seed)
        draws = []
        for _ in range(n_resamples):
            i = rng.integers(0, len(rows), len(rows))
            if np.ptp(error[i]) > 0 and np.ptp(success[i]) > 0:
                draws.append(fn(error[i], success[i])[0])
        lo, hi = np.percentile(draws, [2.5, 97.5]) if draws else (np.nan, np.nan)
        out[key] = {"value": float(value), "p_value": float(p), "ci95": [float(lo), float(hi)]}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--output", required=True, help="folder (resumed when it holds the same plan)")
    p.add_argument("--suite", default="libero_object")
    p.add_argument("--tasks", type=int, nargs="+", default=list(range(10)))
    p.add_argument("--episodes", type=int, default=3, help="per task (official init states 0..N-1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--render-quality", choices=["stock", "fast"], default="stock")
    p.add_argument("--fast-reset", action="store_true")
    p.add_argument("--report", action="store_true",
                   help="only the table of the configs already complete (runs and writes nothing; "
                        "works while a run is going on)")
    args = p.parse_args()
    out = Path(args.output)

    def complete(kind: str, label: str) -> bool:
        path = out / kind / f"{slug(label)}.json"
        return path.exists() and (kind == "replay" or read_eval_results(path).complete)

    if args.report:
        if not (out / "plan.json").exists() or not complete("closed_loop", "dense"):
            sys.exit(f"{out}: no complete dense run yet")
    else:
        lock = lock_folder(out)  # noqa: F841 (held until the process ends)
    open_folder(out, plan(args))  # the same plan, or refused

    dense = closed_loop(args, out, "dense", "none", {}, record=True)
    engine = None
    rows = []
    for label, name, config in CONFIGS:
        if args.report and not (complete("closed_loop", label) and complete("replay", label)):
            continue
        row = {"config": label, **closed_loop(args, out, label, name, config, record=False)}
        if engine is None:
            from prunebench.engine.loop import PruningEngine
            from prunebench.evaluation.contention import set_threads
            from prunebench.models import load_model

            set_threads(args.threads)
            model, _ = load_model(None, seed=args.seed, suite=args.suite)
            engine = PruningEngine(model)
        row["action_error"] = replayed(args, out, label, name, config, engine)
        rows.append(row)
    for row in rows:
        row["success_drop"] = dense["success_rate"] - row["success_rate"]
    summary = {"plan": plan(args), "dense": dense, "configs": rows,
               "correlation": correlations(rows) if len(rows) >= 3 else None}
    if not args.report:
        write_text(out / "proxy_correlation.json", json.dumps(summary, indent=2))
    print(format_table([{**r, "ci": "[{:.2f}, {:.2f}]".format(*r["success_ci95"])} for r in rows],
                       [("config", "config", ""), ("n_episodes", "episodes", "d"), ("success_rate", "success", ".3f"),
                        ("ci", "95% CI", ""), ("success_drop", "drop vs dense", "+.3f"),
                        ("action_error", "replay action error", ".4f")]))
    print(f"dense: success {dense['success_rate']:.3f} over {dense['n_episodes']} episodes")
    if summary["correlation"]:
        c = summary["correlation"]
        for key in ("spearman", "kendall"):
            v = c[key]
            print(f"{key}: {v['value']:+.3f} (p {v['p_value']:.2g}, bootstrap 95% CI over configs "
                  f"[{v['ci95'][0]:+.2f}, {v['ci95'][1]:+.2f}]) over {c['n_configs']} configs")
    if not args.report:
        print(f"wrote {out / 'proxy_correlation.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
