"""``prunebench compare``: strategies against dense, in closed loop on LIBERO or on a stream."""

from __future__ import annotations

import sys

from prunebench.cli.arguments import _add_model_arguments, add_plugin_argument, non_negative_int, positive_int
from prunebench.contract.errors import PrunebenchError
from prunebench.plugins.dense import DENSE
from prunebench.runtime.outputs import OVERWRITE_HELP, claim


def strategy_configs(names: list[str] | None, keep_ratios: list[float]) -> dict[str, tuple[str, dict]]:
    """label -> (strategy, config overrides): the dense baseline first; a strategy with a keep ratio
    once per ``keep_ratios`` value (labelled ``<name>_keep<ratio>`` when there are several)."""
    from prunebench.plugins.manager import MANAGER

    names = names or list(MANAGER.strategies())
    ratios = list(dict.fromkeys(keep_ratios))
    out: dict[str, tuple[str, dict]] = {DENSE: (DENSE, {})}
    for name in dict.fromkeys(names):
        if name == DENSE:
            continue
        if "keep_ratio" not in MANAGER.get(name).Config.model_fields:
            out[name] = (name, {})
        for ratio in ratios if "keep_ratio" in MANAGER.get(name).Config.model_fields else []:
            out[name if len(ratios) == 1 else f"{name}_keep{ratio:g}"] = (name, {"keep_ratio": ratio})
    return out


def _eval_config(args, strategy: str, config: dict, **fields):
    """The closed-loop config of one strategy config on ``fields`` (suite, tasks, episodes, ...)."""
    from prunebench.evaluation.closed_loop import load_eval_config

    return load_eval_config(None, strategy=strategy, config=config, seed=args.seed, model=args.model,
                            device=args.device or "cpu", camera_size=args.camera_size,
                            workers=args.workers, render_quality=args.render_quality,
                            hard_reset=not args.fast_reset, max_steps=args.max_steps, threads=args.threads,
                            **fields)


def _command() -> str:
    return " ".join(["prunebench"] + sys.argv[1:])


def cmd_compare_libero(args) -> int:
    from prunebench.evaluation.closed_loop import evaluate
    from prunebench.evaluation.tables import CLOSED_LOOP_COLUMNS, closed_loop_rows

    if args.shard_episodes:
        raise PrunebenchError("--shard-episodes: only with --storage and --jobs")
    strategies = strategy_configs(args.strategies, args.keep_ratio)
    one = len(args.suite) == 1  # the files directly in the folder, as with one suite always
    out_dir = claim(args.output, f"compare_{args.suite[0]}" if one else "compare", args.overwrite,
                    directory=True, members=[f"{label}.json" for label in strategies] if one else [])
    for suite in args.suite:
        results, files = {}, {}
        for label, (name, overrides) in strategies.items():
            cfg = _eval_config(args, name, overrides, suite=suite, tasks=args.tasks, episodes=args.episodes)
            files[label] = str((out_dir if one else out_dir / suite) / f"{label}.json")
            print(f"{suite} {label}: {args.episodes} episode(s) per task ...", file=sys.stderr, flush=True)
            results[label] = evaluate(cfg, files[label], _command())
        rows = closed_loop_rows(results, files)
        first = next(iter(results.values()))
        print(f"{suite}, tasks {args.tasks or 'all'}, {args.episodes} episode(s) per task from official "
              f"init state 0, policy {first.model['source']}, backend {first.attention_backend}, "
              f"stock protocol: {first.protocol['stock']}")
        _print_rows(rows, CLOSED_LOOP_COLUMNS)
    print(f"wrote {out_dir}/{'' if one else '<suite>/'}<strategy>.json")
    return 0


def cmd_compare(args) -> int:
    if args.storage or args.jobs or args.collect:
        return cmd_compare_jobs(args)
    if args.suite:
        return cmd_compare_libero(args)
    for flag, given in (("--shard-episodes", args.shard_episodes), ("--max-steps", args.max_steps)):
        if given:
            raise PrunebenchError(f"{flag}: only in closed loop; give --suite")
    if len(args.keep_ratio) > 1:
        raise PrunebenchError("--keep-ratio: a synthetic-stream comparison takes one value (several: give --suite)")
    keep_ratio = args.keep_ratio[0]
    import torch
    from pydantic import BaseModel

    from prunebench.cli import arguments  # build_engine looked up when called: tests replace it
    from prunebench.evaluation.contention import load_average
    from prunebench.evaluation.results import StrategyInfo, write_json
    from prunebench.evaluation.runner import run_interleaved
    from prunebench.evaluation.streams import SyntheticStream
    from prunebench.evaluation.tables import COMPARISON_COLUMNS, compare_rows
    from prunebench.evaluation.versions import environment
    from prunebench.models import model_device
    from prunebench.plugins.manager import MANAGER

    output = claim(args.output, "compare", args.overwrite) if args.output else None
    engine, model_info = arguments.build_engine(args.model, args.seed, args.device, threads=args.threads)
    device = model_device(engine.model)
    strategies = {label: MANAGER.create(name, overrides)
                  for label, (name, overrides) in strategy_configs(args.strategies, [keep_ratio]).items()}
    stream = SyntheticStream(n_queries=args.queries, seed=args.seed, image_size=engine.model.cfg.image_size)
    # warm-up so the first timed queries do not pay one-off allocation costs
    run_interleaved(engine, strategies, SyntheticStream(n_queries=2, seed=args.seed + 1,
                                                        image_size=engine.model.cfg.image_size))
    load_start = load_average()
    results = run_interleaved(engine, strategies, stream, seed=args.seed)
    rows = compare_rows(results, load_avg=[load_start, load_average()], device=device)
    env = environment(device, torch.get_num_threads())
    print(f"{args.queries} queries of a synthetic stream, keep ratio {keep_ratio}, model "
          f"{model_info['source']}, backend {engine.attention_backend}, "
          f"{env['torch_threads']} threads on {device}")
    _print_rows(rows, COMPARISON_COLUMNS)

    class Comparison(BaseModel):
        command: str
        seed: int
        keep_ratio: float
        model: dict
        attention_backend: str
        environment: dict  # versions, git hash, device, torch threads
        strategies: dict  # name -> StrategyInfo: config, plugin, distribution, version
        configs: dict
        rows: list  # each with its contention evidence and verdict

    if output:
        write_json(output, Comparison(
            command=_command(), seed=args.seed, keep_ratio=keep_ratio,
            model=model_info, attention_backend=engine.attention_backend, environment=env,
            strategies={n: StrategyInfo.of(n, s).model_dump() for n, s in strategies.items()},
            configs={n: s.config.model_dump() for n, s in strategies.items()},
            rows=[r.model_dump() for r in rows]))
        print(f"wrote {output}")
    return 0


def cmd_compare_jobs(args) -> int:
    """The comparison as jobs on an Optuna storage (prunebench.study.jobs): run them, or --collect."""
    import warnings
    from pathlib import Path

    import optuna

    from prunebench.evaluation.results import write_text
    from prunebench.study.guard import storage_errors
    from prunebench.study.jobs import JobStore, collect

    if not (args.storage and args.jobs):
        raise PrunebenchError(f"{'--jobs' if args.storage else '--storage'}: --storage URL and --jobs NAME go "
                              "together (an Optuna storage, e.g. postgresql://..., and a name for the comparison)")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeat, retries
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per job is ours
    store = JobStore(args.storage, args.jobs)
    with storage_errors(store):
        if args.collect:
            out = claim(args.collect, "", args.overwrite, directory=True)
            written, n_jobs = collect(store, out, write_text)
            print(f"{store.name}: wrote {written} results file(s) of {n_jobs} job(s) to {out}"
                  + (f" ({n_jobs - written} not complete yet)" if written < n_jobs else ""))
            return 0
        if not args.suite:
            raise PrunebenchError("--suite: the jobs are closed-loop episodes; give --suite (or --collect DIR)")
        return _run_jobs(args, store, Path(args.output or f"results/compare/{args.jobs}"))


def _run_jobs(args, store, out) -> int:
    from prunebench.evaluation.closed_loop import evaluate, plan_jobs
    from prunebench.evaluation.libero_env import libero_modules, tasks
    from prunebench.plugins.manager import MANAGER
    from prunebench.study.jobs import JobRunner, claim_folder, expand, open_jobs

    libero_modules()
    strategies = strategy_configs(args.strategies, args.keep_ratio)
    for name, overrides in strategies.values():
        MANAGER.create(name, overrides)  # a bad config: one line, before anything is stored
    for suite in args.suite:  # tasks, init states and step limits against the installed LIBERO
        plan_jobs(_eval_config(args, DENSE, {}, suite=suite, tasks=args.tasks, episodes=args.episodes))
    plan = {"suite": args.suite, "strategies": list(strategies), "keep_ratio": list(dict.fromkeys(args.keep_ratio)),
            "tasks": args.tasks, "episodes": args.episodes, "shard_episodes": args.shard_episodes or args.episodes,
            "seed": args.seed, "model": args.model, "device": args.device or "cpu", "camera_size": args.camera_size,
            "render_quality": args.render_quality, "fast_reset": args.fast_reset, "max_steps": args.max_steps}
    jobs = expand(plan, strategies, lambda suite: [t.task_id for t in tasks(suite)])
    study = open_jobs(store, plan, jobs, _log)
    claim_folder(out, store, args.overwrite)

    def run_job(spec: dict, output):
        fields = {k: spec[k] for k in ("suite", "tasks", "first_init_state", "episodes")}
        return evaluate(_eval_config(args, spec["strategy"], spec["config"], **fields), output, _command())

    runner = JobRunner(store, study, jobs, out, run_job, _log)
    try:
        done = runner.run()
    except KeyboardInterrupt as err:
        return _interrupted(runner, err)
    except Exception:
        if runner.interrupts.stop is None:
            raise
        return _interrupted(runner, runner.interrupts.stop)  # a 2nd signal cut a storage write
    print(f"{store.name}: {done}/{len(jobs)} jobs complete, {runner.ran} of them on this worker, whose results "
          f"files are in {out}/<suite>/<strategy>/; every job's, on any machine: prunebench compare --storage "
          f"{store.storage_url} --jobs {args.jobs} --collect DIR")
    return 0


def _interrupted(runner, err: KeyboardInterrupt) -> int:
    from prunebench.runtime.interrupts import exit_code

    what = f"job {runner.interrupted_job} is retried by the next worker" if runner.interrupted_job is not None \
        else "run the same command to go on"
    print(f"\ninterrupted: {what}", file=sys.stderr)
    return exit_code(err)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _print_rows(rows, columns) -> None:
    """A comparison table, and the note on contended rows under it when there are any."""
    from prunebench.evaluation.contention import table_note
    from prunebench.evaluation.tables import format_table

    print(format_table([r.model_dump() for r in rows], columns))
    note = table_note(r.contended for r in rows)
    if note:
        print(note)


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "compare", help="compare strategies against dense: closed-loop LIBERO (--suite) or a stream",
        description="With --suite: every strategy plays the same LIBERO episodes (official init "
                    "states) with the same policy; prints success, mean query latency, speedup vs "
                    "the same-run dense reference and mean visual tokens. Without: a synthetic "
                    "observation stream (latency and action error only).")
    p.add_argument("--strategies", nargs="*", help="names (default: every registered strategy)")
    add_plugin_argument(p)
    p.add_argument("--keep-ratio", type=float, nargs="+", default=[0.5],
                   help="keep ratio(s) given to strategies that have one (others use their defaults); "
                        "several (closed loop): each such strategy once per value, labelled <name>_keep<ratio>")
    p.add_argument("--seed", type=non_negative_int, default=0)
    _add_model_arguments(p)
    p.add_argument("-o", "--output", help="JSON file (stream), or a directory for one <strategy>.json "
                                          "each (--suite; default results/compare_<suite>_<time>; several "
                                          "suites: <suite>/<strategy>.json; --jobs: <suite>/<strategy>/"
                                          "<shard>.json, default results/compare/<NAME>, shared by the "
                                          "workers of this machine); an existing file or non-empty "
                                          "directory is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    g = p.add_argument_group("LIBERO closed loop")
    g.add_argument("--suite", nargs="+", help="LIBERO suite(s), e.g. libero_object (several: one folder each)")
    g.add_argument("--tasks", type=int, nargs="+", help="task ids (default: every task)")
    g.add_argument("--episodes", type=int, default=1, help="episodes per task (default 1)")
    g.add_argument("--workers", type=int, default=1, help="episodes in parallel processes")
    g.add_argument("--camera-size", type=int, default=128,
                   help="camera resolution in pixels (default 128; OpenVLA-OFT's eval renders 256)")
    g.add_argument("--render-quality", choices=["stock", "fast"], default="stock",
                   help="fast: no MSAA/reflections/shadows (non-stock, recorded)")
    g.add_argument("--fast-reset", action="store_true", help="hard_reset=False (non-stock, recorded)")
    g.add_argument("--max-steps", type=positive_int,
                   help="steps per episode (default: the suite's stock limit; another is non-stock, recorded)")
    g = p.add_argument_group(
        "jobs on many machines", "The comparison as jobs (suite x strategy config x shard of episodes) on an "
        "Optuna storage: every worker runs the same command, on any machine, and takes the next job; see "
        "docs/evaluation.md, 'A comparison on many machines'.")
    g.add_argument("--storage", metavar="URL", help="postgresql://... (several machines), sqlite:///file.db or "
                                                    "journal:file (one machine)")
    g.add_argument("--jobs", metavar="NAME", help="the comparison's name in the storage (the study compare/NAME); "
                                                  "every worker of it gives the same arguments")
    g.add_argument("--shard-episodes", type=positive_int, metavar="K",
                   help="episodes per job: a task's init states in runs of K, or whole tasks grouped when K "
                        "holds several tasks' --episodes (default: one task per job)")
    g.add_argument("--collect", metavar="DIR", help="write every complete job's results file from the storage "
                                                    "into DIR (for 'prunebench report DIR') and exit")
    g = p.add_argument_group("synthetic stream")
    g.add_argument("--queries", type=positive_int, default=24)
    p.set_defaults(func=cmd_compare)
