"""``prunebench study run | resume | show | export`` and ``prunebench plot``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from prunebench.cli.arguments import add_plugin_argument, positive_int
from prunebench.contract.errors import PrunebenchError
from prunebench.runtime.outputs import OVERWRITE_HELP

STUDY_HELP = """Optuna studies over strategy configs: accuracy-latency Pareto fronts.

  prunebench study run studies/object_pareto.yaml       start or continue (any number of workers)
  prunebench study resume studies/object_pareto.yaml    continue a study that exists
  prunebench study show studies/object_pareto.yaml      trials, fronts, hypervolume
  prunebench study export studies/object_pareto.yaml -o fronts.csv
  prunebench plot studies/object_pareto.yaml            plots, PNG and PDF, in <results_dir>/plots

The definition file's fields are documented in docs/studies.md."""


def _quiet_experimental_warnings() -> None:
    """Optuna marks the heartbeat, metric names and retries experimental; studies rely on them."""
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_study_run(args) -> int:
    from prunebench.study.definition import load_study_definition
    from prunebench.study.guard import storage_errors
    from prunebench.study.storage import require_studies
    from prunebench.study.workers import StudyRunner

    _quiet_experimental_warnings()
    defn = load_study_definition(args.definition)
    if args.threads:  # the measuring processes' torch threads, over the definition's evaluation.threads
        defn = defn.model_copy(update={"evaluation": defn.evaluation.model_copy(update={"threads": args.threads})})
    with storage_errors(defn):
        if args.action == "resume":
            require_studies(defn)
        runner = StudyRunner(defn, log=_log)
        if args.fail_running:
            _log(f"marked {runner.fail_running()} running trial(s) failed (they are retried)")
        t0 = time.perf_counter()
        try:
            runner.run()
        except KeyboardInterrupt as err:
            return _interrupted(args, runner, err)
        except Exception:
            if runner.interrupts.stop is None:
                raise
            return _interrupted(args, runner, runner.interrupts.stop)  # a 2nd signal cut a storage write
    print(f"study {defn.name}: done in {time.perf_counter() - t0:.0f} s on this worker "
          f"({defn.storage_url})")
    return cmd_study_show(args)


def _interrupted(args, runner, err: KeyboardInterrupt) -> int:
    """One line: what happened to the running trial, and how to go on."""
    from prunebench.runtime.interrupts import exit_code

    retried = runner.interrupted_trial
    what = f"trial {retried[1]} of {retried[0]} is retried with the same parameters by " if retried else \
        "continue with "
    print(f"\ninterrupted: {what}'prunebench study resume {args.definition}'", file=sys.stderr)
    return exit_code(err)


def _table(defn):
    from prunebench.study.pareto import trials_table

    df = trials_table(defn)
    if df.empty:
        raise PrunebenchError(f"study {defn.name!r} has no complete trials in {defn.storage_url}")
    return df


def cmd_study_show(args) -> int:
    from prunebench.evaluation.tables import format_table
    from prunebench.study.definition import load_study_definition
    from prunebench.study.guard import storage_errors
    from prunebench.study.pareto import hypervolume_history
    from prunebench.study.storage import require_studies

    defn = load_study_definition(args.definition)
    with storage_errors(defn):
        for strategy, study in require_studies(defn).items():
            states: dict[str, int] = {}
            for t in study.get_trials(deepcopy=False):
                states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
            print(f"{strategy}: " + ", ".join(f"{n} {s}" for s, n in sorted(states.items())))
        df = _table(defn)
    columns = [("strategy", "strategy", ""), ("trial", "trial", "d")] + [
        (o, o, ".4g") for o in defn.objectives] + [
        ("keep_ratio", "keep ratio", ".2f"), ("feasible", "feasible", ""), ("params", "params", "")]
    if "n_errors" in df and df["n_errors"].notna().any():  # closed loop: episodes that raised
        columns[2:2] = [("n_episodes", "episodes", ".0f"), ("n_errors", "errors", ".0f")]
    front = df[df["front"] | df["dense"]]
    print(f"\nPareto front per strategy ({', '.join(f'{o} {d}' for o, d in zip(defn.objectives, defn.directions))}):")
    print(format_table(front.to_dict("records"), columns))
    combined = df[df["combined_front"]]
    print("\ncombined front: " + ", ".join(f"{s} #{t}" for s, t in zip(combined["strategy"], combined["trial"])))
    hv = hypervolume_history(df, defn).groupby("strategy").last()
    print("hypervolume: " + ", ".join(f"{s} {v:.4g}" for s, v in hv["hypervolume"].items()))
    return 0


def cmd_study_export(args) -> int:
    from prunebench.evaluation.results import write_text
    from prunebench.runtime.outputs import claim
    from prunebench.study.definition import load_study_definition
    from prunebench.study.pareto import hypervolume_history, objective_matrix, reference_point

    defn = load_study_definition(args.definition)
    output = claim(args.output, "export", args.overwrite)
    df = _table(defn)
    fmt = args.format or ("csv" if output.suffix == ".csv" else "json")
    if fmt == "csv":
        write_text(output, df.to_csv(index=False))
    else:
        values, signs = objective_matrix(df, defn)
        hv = hypervolume_history(df, defn)
        out = {"study": defn.name, "definition": defn.model_dump(mode="json"),
               "objectives": defn.objectives, "directions": defn.directions,
               "hypervolume_reference": (reference_point(values) * signs).tolist(),
               "fronts": {s: g.loc[g["front"], "trial"].tolist() for s, g in df.groupby("strategy")},
               "combined_front": [{"strategy": s, "trial": int(t)} for s, t in
                                  zip(df.loc[df["combined_front"], "strategy"], df.loc[df["combined_front"], "trial"])],
               "hypervolume_history": hv.to_dict("records"),
               "trials": json.loads(df.to_json(orient="records", date_format="iso"))}
        write_text(output, json.dumps(out, indent=2))
    print(f"wrote {output} ({len(df)} trials)")
    return 0


def cmd_plot(args) -> int:
    from prunebench.runtime.outputs import claim
    from prunebench.study import plots
    from prunebench.study.definition import load_study_definition
    from prunebench.study.pareto import hypervolume_history

    defn = load_study_definition(args.definition)
    out = claim(args.output or defn.results_path / "plots", "plots", args.overwrite, directory=True)
    df = _table(defn)
    written = plots.pareto_front(df, defn.objectives, out / "pareto_front", title=f"{defn.name}: Pareto fronts")
    written += plots.quality_vs_keep_ratio(df, out / "quality_vs_keep_ratio")
    written += plots.speedup_per_suite(df, out / "speedup_per_suite")
    representatives = plots.front_representatives(df, defn.objectives)
    written += plots.latency_breakdown(representatives, out / "latency_breakdown")
    written += plots.hypervolume_vs_trials(hypervolume_history(df, defn), out / "hypervolume")
    written += _token_plots(defn, representatives, out, args)
    for path in written:
        print(f"wrote {path}")
    return 0


def _token_plots(defn, representatives, out: Path, args) -> list[Path]:
    """Heatmap and overlay for each strategy's representative front config, on one stream."""
    from prunebench.evaluation.figures import token_plots
    from prunebench.evaluation.replay import RecordedStream
    from prunebench.evaluation.streams import SyntheticStream
    from prunebench.models import load_model

    evaluation = defn.evaluation
    model, _ = load_model(evaluation.model, seed=defn.seed, suite=evaluation.closed_loop.get("suite"),
                          device=evaluation.device)
    if args.stream:
        stream = RecordedStream(args.stream)
    else:
        stream = SyntheticStream(n_queries=args.queries, seed=defn.seed, image_size=model.cfg.image_size)
    source = Path(args.stream).name if args.stream else "synthetic stream"
    configs = [(row["strategy"], f"{row['strategy']} trial {row['trial']}", row["strategy"], json.loads(row["config"]))
               for _, row in representatives[~representatives["dense"]].iterrows()]
    return token_plots(model, configs, list(stream), out, defn.seed, source)  # the stream read once


def add_parsers(sub) -> None:
    p = sub.add_parser("study", help="Optuna Pareto studies: run | resume | show | export",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=STUDY_HELP)
    actions = p.add_subparsers(dest="action", required=True)
    for action, text in (("run", "start or continue a study; several workers may run at once"),
                         ("resume", "continue a study that exists (after a crash or kill)")):
        a = actions.add_parser(action, help=text, description=text)
        a.add_argument("definition", help="study definition (YAML/JSON), e.g. studies/object_pareto.yaml")
        a.add_argument("--threads", type=positive_int, metavar="N",
                       help="torch threads of each process that measures (default: the definition's "
                            "evaluation.threads, else the cores / the processes running at once)")
        a.add_argument("--fail-running", action="store_true",
                       help="mark RUNNING trials failed and retry them first (journal storage, which "
                            "has no heartbeat; only when no other worker is alive)")
        add_plugin_argument(a)
        a.set_defaults(func=cmd_study_run)
    a = actions.add_parser("show", help="trials per state, Pareto fronts, hypervolume")
    a.add_argument("definition")
    add_plugin_argument(a)
    a.set_defaults(func=cmd_study_show)
    a = actions.add_parser("export", help="the trials table with Pareto masks, as CSV or JSON")
    a.add_argument("definition")
    a.add_argument("-o", "--output", required=True,
                   help="file (.csv or .json; an existing file is refused unless --overwrite)")
    a.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    a.add_argument("--format", choices=["csv", "json"], help="default: from the file suffix")
    add_plugin_argument(a)
    a.set_defaults(func=cmd_study_export)

    p = sub.add_parser("plot", help="plots of a study (PNG and PDF): fronts, keep ratio, speedup, "
                                    "latency breakdown, hypervolume, kept tokens")
    p.add_argument("definition", help="study definition (YAML/JSON)")
    p.add_argument("-o", "--output", help="directory (default <results_dir>/plots); a non-empty one is "
                                          "refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty directory, replacing plots of the same names")
    p.add_argument("--stream", help="recorded stream (.npz) for the kept-token plots (default synthetic)")
    p.add_argument("--queries", type=int, default=8, help="synthetic stream length for the token plots")
    add_plugin_argument(p)
    p.set_defaults(func=cmd_plot)
