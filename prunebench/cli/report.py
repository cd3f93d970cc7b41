"""``prunebench report``: one table, one report file and one set of plots from any number of
closed-loop results files (shards of a run, repeated runs, one file per strategy)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from prunebench.cli.arguments import add_plugin_argument, device_arg
from prunebench.contract.errors import PrunebenchError
from prunebench.plugins.dense import DENSE
from prunebench.runtime.outputs import OVERWRITE_HELP, claim

PLOTS = ("success_vs_keep_ratio", "pareto_front", "latency_breakdown", "success_per_task")


def results_paths(given: list[str]) -> list[Path]:
    """Files as given; a directory stands for every *.json under it (``compare --jobs`` lays files out
    as <suite>/<strategy>/<shard>.json), except the report.json of an earlier report."""
    paths: list[Path] = []
    for item in map(Path, given):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*.json") if p.is_file() and p.name != "report.json")
            if not found:
                raise PrunebenchError(f"{item}: a directory with no results files (*.json)")
            paths += found
        else:
            paths.append(item)
    return list(dict.fromkeys(paths))  # a file named twice counts once


def cmd_report(args) -> int:
    from prunebench.cli.compare import _print_rows
    from prunebench.evaluation.merge import merge_results
    from prunebench.evaluation.paired import compare_to_baseline
    from prunebench.evaluation.report import per_task_table
    from prunebench.evaluation.tables import CLOSED_LOOP_COLUMNS, closed_loop_rows, format_table

    if args.stream and not args.output:
        raise PrunebenchError("--stream: the kept-patch overlays are plots; give -o DIR")
    paths = results_paths(args.results)
    out = claim(args.output, "report", args.overwrite, directory=True,
                members=["report.json"]) if args.output else None
    merged = merge_results(paths, allow_incomplete=args.partial)
    files = {label: " + ".join(s["file"] for s in res.config["merged_from"]) for label, res in merged.items()}
    rows = closed_loop_rows(merged, files, delta=args.delta)
    baseline = DENSE if DENSE in merged else None
    paired = compare_to_baseline({k: r.episodes for k, r in merged.items()}, baseline=baseline,
                                 delta=args.delta) if baseline else {}
    first = next(iter(merged.values()))
    episodes = sum(len(r.episodes) for r in merged.values())
    print(f"{len(paths)} file(s), {len(merged)} strateg{'y' if len(merged) == 1 else 'ies'}, {episodes} "
          f"episodes; suites {', '.join(sorted({s for r in merged.values() for s in r.per_suite}))}, "
          f"policy {first.model.get('source')}, backend {first.attention_backend}, "
          f"stock protocol: {first.protocol.get('stock')}")
    if not baseline:
        print("no dense ('none') run among the files: no paired comparison")
    # the header names the margin this report used
    _print_rows(rows, [(k, f"not worse (δ {100 * args.delta:g} pts)" if k == "not_worse" else h, f)
                       for k, h, f in CLOSED_LOOP_COLUMNS])
    per_task = per_task_table(merged)
    if args.per_task:
        cells = [{"strategy": label, **row} for label, row in per_task.to_dict("index").items()]
        print("\nsuccess rate per task:")
        print(format_table(cells, [("strategy", "strategy", "")] + [(t, t, ".2f") for t in per_task.columns]))
    if out is None:
        return 0
    from prunebench.evaluation.report import report_content
    from prunebench.evaluation.results import write_text

    written = _plots(merged, paired, per_task, out, args)
    content = report_content(merged, rows, paired, per_task, args.delta, baseline,
                             " ".join(["prunebench"] + sys.argv[1:]))
    written.insert(0, write_text(out / "report.json", json.dumps(content, indent=2, default=str)))
    for path in written:
        print(f"wrote {path}")
    return 0


def _plots(merged, paired, per_task, out: Path, args) -> list[Path]:
    from prunebench.evaluation import figures
    from prunebench.evaluation.report import runs_frame
    from prunebench.study.pareto import pareto_mask

    df = runs_frame(merged, paired)
    written = []
    measured = df.dropna(subset=["latency_ms", "success_rate"]).copy() if "latency_ms" in df else df.iloc[:0]
    if not measured.empty:  # some run has queries and outcomes
        values = measured[["latency_ms", "success_rate"]].to_numpy(float) * [1.0, -1.0]  # both minimised
        measured["combined_front"] = pareto_mask(values)
        measured["front"] = False
        for _, index in measured.groupby("strategy").groups.items():
            rows = [measured.index.get_loc(i) for i in index]
            measured.loc[index, "front"] = pareto_mask(values[rows])
        written += figures.success_vs_keep_ratio(measured, out / "success_vs_keep_ratio")
        written += figures.pareto_front(measured, "latency_ms", "success_rate", out / "pareto_front",
                                        title="Success vs latency (bars: 95 % Wilson CI, p10-p90 latency)",
                                        xlabel="median query latency (ms)")
        written += figures.latency_breakdown(df.dropna(subset=["latency_ms"]), out / "latency_breakdown")
    if per_task.notna().any(axis=None):
        written += figures.task_heatmap(per_task, out / "success_per_task")
    if args.stream:
        written += _overlays(merged, df, out, args)
    return written


def _overlays(merged, df, out: Path, args) -> list[Path]:
    """The kept patches of each merged config on a recorded LIBERO stream's real frames."""
    from prunebench.evaluation.figures import file_stem, token_plots
    from prunebench.evaluation.replay import RecordedStream
    from prunebench.models import load_model

    first = next(iter(merged.values()))
    source = args.model or first.model.get("source")
    if not args.model and str(source).startswith("random-init"):
        raise PrunebenchError(f"--stream: the results' model is {source}, not a file; give --model")
    try:
        model, info = load_model(source, seed=first.seed, suite=first.protocol.get("suite"),
                                 device=args.device or "cpu")
    except PrunebenchError as err:
        raise PrunebenchError(f"--stream: model {source!r} of the results files: {err} (give --model)") from None
    recorded = first.model.get("sha256")
    if not args.model and recorded and info.get("sha256") not in (None, recorded):
        raise PrunebenchError(f"--stream: {source} has changed since the runs (sha256 differs); give --model")
    items = list(RecordedStream(args.stream))  # read once for every config
    configs = [(file_stem(row["label"]), row["label"], row["strategy"], json.loads(row["config"]))
               for _, row in df[~df["dense"]].iterrows()]
    return token_plots(model, configs, items, out, first.seed, Path(args.stream).name)


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "report", help="one table and one set of plots from closed-loop results files (shards, repeats)",
        description="Merges closed-loop results files (one per strategy, or shards of a run split by "
                    "--tasks or init states) by strategy and config, refuses files that measured "
                    "different things (protocol, model, seeds, version, backend, schema) or repeat an "
                    "episode, and prints the closed-loop table with paired statistics against dense. "
                    "With -o: report.json and the plots. See docs/evaluation.md.")
    p.add_argument("results", nargs="+", metavar="RESULTS",
                   help="results files, or directories (every *.json under them, report.json aside)")
    p.add_argument("-o", "--output", help="directory for report.json and the plots (PNG and PDF); a "
                                          "non-empty one is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--delta", type=float, default=0.05,
                   help="non-inferiority margin: 'not worse' when the success difference to dense is "
                        "above -delta with 95 %% confidence (default 0.05)")
    p.add_argument("--per-task", action="store_true", help="also a strategy x task table of success rates")
    p.add_argument("--partial", action="store_true",
                   help="merge incomplete files (interrupted or aborted runs): their finished episodes")
    p.add_argument("--stream", metavar="FILE.npz",
                   help="a stream recorded with 'prunebench run --suite ... --record-streams DIR': "
                        "each config's kept patches drawn on its real frames (needs -o)")
    p.add_argument("--model", help="model for --stream (default: the one the results files name)")
    p.add_argument("--device", type=device_arg, help="device for --stream (default cpu)")
    add_plugin_argument(p)
    p.set_defaults(func=cmd_report)
