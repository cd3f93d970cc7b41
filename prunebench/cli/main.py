"""The ``prunebench`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from prunebench.plugins.dense import DENSE
from prunebench.contract.errors import PrunebenchError
from prunebench.runtime.interrupts import exit_code, sigterm_interrupts
from prunebench.runtime.outputs import OVERWRITE_HELP, claim, releasing

EPILOG = """examples:
  prunebench compare --suite libero_object --tasks 0 2 4 --episodes 2 --workers 2
                                           compare the built-in strategies in closed loop on the
                                           shipped policy (success, latency, speedup, tokens)
  prunebench compare                       the same on a synthetic stream (no simulator)
  prunebench plugins                       list plugins and the strategies they register
  prunebench validate run.yaml             check a run config without running it
  prunebench run --suite libero_object --strategy random --episodes 2
                                           closed-loop LIBERO episodes (needs the libero extra)
  prunebench run --strategy random --set keep_ratio=0.25 --queries 32
                                           a synthetic observation stream (no simulator)
  prunebench replay results/streams --strategy fastv --set keep_ratio=0.25
                                           action error vs dense on recorded LIBERO streams
  prunebench suites                        LIBERO suites, their tasks and stock max steps
  prunebench study run studies/object_pareto.yaml && prunebench plot studies/object_pareto.yaml
                                           an Optuna Pareto search over strategy configs, its plots
  prunebench demos && prunebench train -o policy.safetensors
                                           make expert demos and train the built-in policy
"""


def cmd_plugins(args) -> int:
    from prunebench.plugins.manager import MANAGER

    rows = MANAGER.plugins()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        if row.get("broken"):
            print(f"{row['name']}  BROKEN: {row['broken']}")
            continue
        kind = "built-in" if row["builtin"] else row["distribution"]
        print(f"{row['name']}  {row['version']}  ({kind})")
        print(f"    hooks: {', '.join(row['hooks'])}")
        for name in row["strategies"]:
            cls = MANAGER.get(name)
            print(f"    strategy {name}: positions={cls.position_ids}  {(cls.__doc__ or '').strip().splitlines()[0] if cls.__doc__ else ''}")
    return 0


def cmd_validate(args) -> int:
    from prunebench.evaluation.config import load_run_config
    from prunebench.plugins.manager import MANAGER

    run = load_run_config(args.config)
    strategy = MANAGER.create(run.strategy, run.config)
    print(f"ok: strategy {run.strategy!r} with {strategy.config.model_dump()}")
    return 0


def _engine(model_path, seed, device=None, suite=None, threads=None):
    from prunebench.evaluation.contention import set_threads
    from prunebench.engine.loop import PruningEngine
    from prunebench.models import load_model

    set_threads(threads)  # this process measures: its torch threads (default: every core) are set
    model, info = load_model(model_path, seed=seed, suite=suite, device=device or "cpu")
    if not info["trained"]:
        print("note: no trained weights found; using a randomly initialised built-in model",
              file=sys.stderr)
    return PruningEngine(model), info


def cmd_run(args) -> int:
    if args.suite or (args.config and _is_eval_config(args.config)):
        return cmd_run_libero(args)
    return cmd_run_stream(args)


def _is_eval_config(path: str) -> bool:
    from prunebench.evaluation.config import read_config_file

    return "suite" in read_config_file(path)


def cmd_run_libero(args) -> int:
    from tqdm import tqdm

    from prunebench.evaluation.closed_loop import evaluate, load_eval_config, plan_jobs, print_summary
    from prunebench.evaluation.config import parse_overrides

    cfg = load_eval_config(
        args.config, strategy=args.strategy, seed=args.seed, model=args.model, device=args.device,
        suite=args.suite,
        tasks=args.tasks, episodes=args.episodes, first_init_state=args.first_init_state,
        camera_size=args.camera_size, render=args.render, render_quality=args.render_quality,
        hard_reset=False if args.fast_reset else None, max_steps=args.max_steps, workers=args.workers,
        dense_reference=False if args.no_dense_reference else None,
        video_dir=args.video_dir or ("results/videos" if args.video else None),
        record_dir=args.record_streams, record_history=args.record_history,
        skip_first_actions=args.skip_first_actions, threads=args.threads)
    if args.set:
        cfg = cfg.model_copy(update={"config": {**cfg.config, **parse_overrides(args.set)}})
    _, _, task_list = plan_jobs(cfg)
    output = claim(args.output, f"{cfg.suite}_{cfg.strategy}", args.overwrite)
    bars = {t.task_id: tqdm(total=cfg.episodes, desc=f"task {t.task_id:>2} {t.instruction[:40]}",
                            position=i, leave=True, file=sys.stderr, disable=None, dynamic_ncols=True)
            for i, t in enumerate(task_list)}
    wins: dict[int, int] = {}

    def progress(ep) -> None:
        wins[ep.task_id] = wins.get(ep.task_id, 0) + ep.success
        bar = bars[ep.task_id]
        bar.update(1)
        bar.set_postfix(success=f"{wins[ep.task_id]}/{bar.n}")
        if bar.disable:  # no terminal: one line per episode instead
            print(f"task {ep.task_id} init {ep.init_state_id}: "
                  f"{'success' if ep.success else ep.failure_reason} after {ep.steps} steps "
                  f"({ep.wall_s:.1f} s)", file=sys.stderr, flush=True)

    command = " ".join(["prunebench"] + sys.argv[1:])
    try:
        results = evaluate(cfg, output, command, on_episode=progress)
    except KeyboardInterrupt as err:
        for bar in bars.values():
            bar.close()
        print(f"\ninterrupted: the episodes finished so far are in {output}", file=sys.stderr)
        return exit_code(err)
    for bar in bars.values():
        bar.close()
    print_summary(results)
    print(f"wrote {output}")
    return 0


def cmd_suites(args) -> int:
    from prunebench.evaluation.libero_env import stock_max_steps, suite_names, tasks, unavailable

    names = [args.suite] if args.suite else suite_names()
    for name in names:
        if not args.suite and unavailable(name):  # listed with the reason; a named one is an error
            print(f"{name}  (unavailable: {unavailable(name)})")
            continue
        limit = stock_max_steps(name)
        listed = tasks(name)
        print(f"{name}  ({len(listed)} tasks, max steps {limit if limit else 'none: give --max-steps'})")
        if args.suite:
            for t in listed:
                print(f"  {t.task_id:>2}  {t.instruction}  ({t.n_init_states} init states)")
    return 0


def cmd_replay(args) -> int:
    from prunebench.evaluation.config import parse_overrides
    from prunebench.plugins.manager import MANAGER
    from prunebench.evaluation.contention import summary_line
    from prunebench.evaluation.replay import RecordedStream, replay, stream_files
    from prunebench.evaluation.results import write_json

    strategy = MANAGER.create(args.strategy, parse_overrides(args.set))
    streams = [RecordedStream(p) for p in stream_files(args.streams)]
    output = claim(args.output, "replay", args.overwrite) if args.output else None
    suite = streams[0].header.get("suite") if streams else None  # picks an OFT checkpoint's norm stats
    engine, _ = _engine(args.model, args.seed, args.device, suite, args.threads)
    report = replay(engine, strategy, streams, seed=args.seed, name=args.strategy)
    a = report.action_error
    print(f"{args.strategy}: {report.n_queries} queries from {report.n_streams} streams; action error vs "
          f"dense mean {a.mean:.4f}, median {a.median:.4f}, p90 {a.p90:.4f}; speedup vs dense "
          f"{report.speedup_vs_dense['total']:.2f} (LLM {report.speedup_vs_dense['llm']:.2f})")
    print(summary_line(report.contention))
    if output:
        write_json(output, report)
        print(f"wrote {output}")
    return 0


def cmd_run_stream(args) -> int:
    import torch

    from prunebench.evaluation.config import RunConfig, load_run_config, parse_overrides
    from prunebench.evaluation.contention import load_average, of_records, summary_line
    from prunebench.models import model_device
    from prunebench.plugins.manager import MANAGER
    from prunebench.evaluation.results import QuerySummary, RunResults, StrategyInfo, write_json
    from prunebench.evaluation.runner import run_stream
    from prunebench.evaluation.streams import SyntheticStream
    from prunebench.runtime.versions import environment

    if args.config:
        run = load_run_config(args.config)
    elif args.strategy:
        run = RunConfig(strategy=args.strategy, seed=args.seed or 0, model=args.model,
                        device=args.device or "cpu")
    else:
        raise PrunebenchError("give --strategy NAME or --config FILE")
    overrides = parse_overrides(args.set)
    strategy = MANAGER.create(run.strategy, {**run.config, **overrides})
    output = claim(args.output, f"stream_{run.strategy}", args.overwrite)
    engine, model_info = _engine(run.model, run.seed, run.device, threads=args.threads or run.threads)
    device = model_device(engine.model)
    stream = SyntheticStream(n_queries=args.queries, seed=run.seed,
                             image_size=engine.model.cfg.image_size)
    load_start = load_average()
    results = run_stream(engine, strategy, stream, seed=run.seed)
    records = [r.record for r in results]
    out = RunResults(
        command=" ".join(["prunebench"] + sys.argv[1:]), seed=run.seed,
        strategy=StrategyInfo.of(run.strategy, strategy),
        model=model_info, source=stream.describe(), attention_backend=engine.attention_backend,
        environment=environment(device, torch.get_num_threads()), summary=QuerySummary.of(records),
        contention=of_records(records, [load_start, load_average()], device=device), queries=records)
    path = write_json(output, out)
    s = out.summary
    print(f"{run.strategy}: {s.n_queries} queries, median {s.latency_ms['total'].median:.2f} ms "
          f"(LLM {s.latency_ms['llm'].median:.2f} ms){' *contended*' if out.contention.contended else ''}, "
          f"mean visual tokens {s.mean_visual_tokens:.1f}, "
          f"LLM FLOPs {s.mean_llm_flops / 1e9:.3f} G (dense {s.dense_llm_flops / 1e9:.3f} G); "
          f"{out.environment['torch_threads']} threads on {device}")
    print(summary_line(out.contention))
    print(f"wrote {path}")
    return 0


def _strategies_to_compare(names: list[str] | None, keep_ratio: float) -> dict[str, dict]:
    """Config overrides per strategy: the dense baseline first, ``keep_ratio`` where a strategy has one."""
    from prunebench.plugins.manager import MANAGER

    names = names or list(MANAGER.strategies())
    out = {DENSE: {}}
    for name in names:
        if name != DENSE:
            fields = MANAGER.get(name).Config.model_fields
            out[name] = {"keep_ratio": keep_ratio} if "keep_ratio" in fields else {}
    return out


def cmd_compare_libero(args) -> int:
    from prunebench.evaluation.closed_loop import evaluate, load_eval_config
    from prunebench.evaluation.tables import CLOSED_LOOP_COLUMNS, closed_loop_rows, format_table
    from prunebench.evaluation.contention import table_note

    strategies = _strategies_to_compare(args.strategies, args.keep_ratio)
    out_dir = claim(args.output, f"compare_{args.suite}", args.overwrite, directory=True,
                    members=[f"{name}.json" for name in strategies])
    results, files = {}, {}
    for name, overrides in strategies.items():
        cfg = load_eval_config(None, strategy=name, config=overrides, seed=args.seed, model=args.model,
                               device=args.device or "cpu", camera_size=args.camera_size,
                               suite=args.suite, tasks=args.tasks, episodes=args.episodes,
                               workers=args.workers, render_quality=args.render_quality,
                               hard_reset=not args.fast_reset, threads=args.threads)
        files[name] = str(out_dir / f"{name}.json")
        print(f"{name}: {args.episodes} episode(s) per task ...", file=sys.stderr, flush=True)
        results[name] = evaluate(cfg, files[name], " ".join(["prunebench"] + sys.argv[1:]))
    rows = closed_loop_rows(results, files)
    first = next(iter(results.values()))
    print(f"{args.suite}, tasks {args.tasks or 'all'}, {args.episodes} episode(s) per task from official "
          f"init state 0, policy {first.model['source']}, backend {first.attention_backend}, "
          f"stock protocol: {first.protocol['stock']}")
    print(format_table([r.model_dump() for r in rows], CLOSED_LOOP_COLUMNS))
    note = table_note(r.contended for r in rows)
    if note:
        print(note)
    print(f"wrote {out_dir}/<strategy>.json")
    return 0


def cmd_compare(args) -> int:
    if args.suite:
        return cmd_compare_libero(args)
    import torch

    from prunebench.evaluation.tables import COMPARISON_COLUMNS, compare_rows, format_table
    from prunebench.evaluation.contention import load_average, table_note
    from prunebench.models import model_device
    from prunebench.plugins.manager import MANAGER
    from prunebench.evaluation.results import StrategyInfo, write_json
    from prunebench.evaluation.runner import run_interleaved
    from prunebench.evaluation.streams import SyntheticStream
    from prunebench.runtime.versions import environment
    from pydantic import BaseModel

    output = claim(args.output, "compare", args.overwrite) if args.output else None
    engine, model_info = _engine(args.model, args.seed, args.device, threads=args.threads)
    device = model_device(engine.model)
    strategies = {name: MANAGER.create(name, overrides)
                  for name, overrides in _strategies_to_compare(args.strategies, args.keep_ratio).items()}
    stream = SyntheticStream(n_queries=args.queries, seed=args.seed, image_size=engine.model.cfg.image_size)
    # warm-up so the first timed queries do not pay one-off allocation costs
    run_interleaved(engine, strategies, SyntheticStream(n_queries=2, seed=args.seed + 1,
                                                        image_size=engine.model.cfg.image_size))
    load_start = load_average()
    results = run_interleaved(engine, strategies, stream, seed=args.seed)
    rows = compare_rows(results, load_avg=[load_start, load_average()], device=device)
    env = environment(device, torch.get_num_threads())
    print(f"{args.queries} queries of a synthetic stream, keep ratio {args.keep_ratio}, model "
          f"{model_info['source']}, backend {engine.attention_backend}, "
          f"{env['torch_threads']} threads on {device}")
    print(format_table([r.model_dump() for r in rows], COMPARISON_COLUMNS))
    note = table_note(r.contended for r in rows)
    if note:
        print(note)

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
            command=" ".join(["prunebench"] + sys.argv[1:]), seed=args.seed, keep_ratio=args.keep_ratio,
            model=model_info, attention_backend=engine.attention_backend, environment=env,
            strategies={n: StrategyInfo.of(n, s).model_dump() for n, s in strategies.items()},
            configs={n: s.config.model_dump() for n, s in strategies.items()},
            rows=[r.model_dump() for r in rows]))
        print(f"wrote {output}")
    return 0


def cmd_demos(args) -> int:
    from prunebench.training.demos import generate, is_dataset, load_demo_config

    cfg = load_demo_config(args.config, suite=args.suite, tasks=args.tasks, per_task=args.per_task,
                           noise=args.noise, render_every=args.render_every, workers=args.workers,
                           seed_offset=args.seed_offset)
    out = Path(args.output)
    # resumable: a dataset of ours is continued, but generate() writes config.json and
    # manifest.json, which would destroy a user's files of those names in any other folder
    if out.is_dir() and any(out.iterdir()) and not is_dataset(out):
        raise PrunebenchError(f"{out} is not empty and holds no demo dataset (no config.json from "
                              f"'prunebench demos'); give a new or empty --output")
    claim(out, "demos", True, directory=True)
    manifest = generate(cfg, out)
    for task, row in manifest["tasks"].items():
        print(f"task {task:>2}: {row['demos']} demos, {row['failed']} failed attempts")
    print(f"wrote {args.output}")
    return 0


def cmd_train(args) -> int:
    from prunebench.training.train import load_train_config, main_log, train

    cfg = load_train_config(args.config, data=args.data, steps=args.steps, seed=args.seed,
                            batch_size=args.batch_size, threads=args.threads)
    output = claim(args.output, "policy", args.overwrite, suffix=".safetensors")
    summary = train(cfg, output, log=main_log)
    print(f"trained {summary['parameters']:,} parameters on {summary['demos']} demos "
          f"({summary['frames']} frames) in {summary['train_minutes']:.1f} min; "
          f"final val L1 {summary['history'][-1]['val_l1']:.4f}")
    print(f"wrote {output}")
    return 0


def cmd_check_oft(args) -> int:
    from prunebench.models.check_oft import check, print_report
    from prunebench.evaluation.results import write_text

    output = claim(args.output, "check_oft", args.overwrite) if args.output else None
    report = check(args.checkpoint, suite=args.suite, device=args.device, n=args.observations,
                   reference=args.reference, tolerance=args.tolerance, synthetic=args.synthetic,
                   trust_remote_code=args.trust_remote_code)
    print_report(report)
    if output:
        write_text(output, json.dumps(report, indent=2))
        print(f"wrote {output}")
    return 0 if report["passed"] else 1


class _Parser(argparse.ArgumentParser):
    """A bad flag is one line, like every other bad input (exit status 2); the usage is one -h away."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see '{self.prog} -h')\n")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value
    return parse


positive_int = _int_at_least(1)  # argparse types: counts ...
non_negative_int = _int_at_least(0)  # ... and seeds


def device_arg(text: str) -> str:
    """argparse type: a device in one of the forms prunebench knows (config.parse_device)."""
    from prunebench.evaluation.config import parse_device

    try:
        return parse_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_model_arguments(p) -> None:
    p.add_argument("--model", help="MiniOFT safetensors file, or an OpenVLA-OFT checkpoint directory or hub "
                                   "id (default: the built-in model)")
    p.add_argument("--device", type=device_arg,
                   help="cpu (default) or cuda[:N]; OpenVLA-OFT runs in bfloat16 on cuda")
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="torch threads of each process that measures (default: the cores / the "
                        "processes running at once)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="prunebench", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Compare visual-token pruning strategies for VLA models on equal terms.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list plugins, their versions, hooks and strategies")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("validate", help="check a run config (YAML/JSON) without running it")
    p.add_argument("config", help="file with 'strategy:' and 'config:' (the strategy's fields)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "run", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="run one strategy: closed-loop LIBERO episodes (--suite) or a synthetic stream",
        description="With --suite: closed-loop LIBERO episodes under OpenVLA-OFT's protocol (official "
                    "init states, 10 wait steps, stock max steps, 8-action chunks open-loop), written "
                    "to a results JSON after every episode. Without: a synthetic observation stream.")
    p.add_argument("--strategy", help="registered strategy name (see 'prunebench plugins')")
    p.add_argument("--config", help="run config file (YAML/JSON) instead of, or under, the flags")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a strategy config field (repeatable), e.g. --set keep_ratio=0.25")
    p.add_argument("--seed", type=non_negative_int, default=None, help="run seed (default 0)")
    _add_model_arguments(p)
    p.add_argument("-o", "--output", help="results JSON path, claimed when the run starts; an existing "
                                          "file is refused unless --overwrite (default: results/"
                                          "<suite or stream>_<strategy>_<time>.json, never shared)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    g = p.add_argument_group("LIBERO closed loop")
    g.add_argument("--suite", help="LIBERO suite, e.g. libero_object (see 'prunebench suites')")
    g.add_argument("--tasks", type=int, nargs="+", help="task ids (default: every task)")
    g.add_argument("--episodes", type=int, help="episodes per task (default 1)")
    g.add_argument("--first-init-state", type=int, help="episode k uses official init state FIRST+k")
    g.add_argument("--camera-size", type=int, help="camera resolution in pixels (default 128)")
    g.add_argument("--render", choices=["query", "every_step"],
                   help="render cameras only when needed (default) or every step like the stock eval")
    g.add_argument("--render-quality", choices=["stock", "fast"],
                   help="fast: no MSAA/reflections/shadows (2.5x faster, pixels differ)")
    g.add_argument("--fast-reset", action="store_true",
                   help="hard_reset=False: 10x faster resets, trajectories not bit-identical")
    g.add_argument("--max-steps", type=int, help="override the suite's stock max steps (non-stock; "
                                                  "SpecPrune-VLA's release used 330/450/600)")
    g.add_argument("--skip-first-actions", type=int,
                   help="pop the first N actions without executing them (SpecPrune-VLA's release: 9)")
    g.add_argument("--workers", type=int, help="episodes in parallel processes (default 1)")
    g.add_argument("--no-dense-reference", action="store_true",
                   help="skip the dense forward per query (no speedup or action error vs dense)")
    g.add_argument("--video", action="store_true", help="write an mp4 per episode to results/videos")
    g.add_argument("--video-dir", help="write episode videos here instead")
    g.add_argument("--record-streams", metavar="DIR", help="record each episode's observation stream")
    g.add_argument("--record-history", type=int,
                   help="frames to record before each query, for replaying history-based strategies")
    g = p.add_argument_group("synthetic stream")
    g.add_argument("--queries", type=positive_int, default=16, help="queries in the synthetic stream")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("replay", help="action error vs dense of a strategy on recorded LIBERO streams")
    p.add_argument("streams", nargs="+", help="stream files (.npz) or directories of them")
    p.add_argument("--strategy", required=True, help="registered strategy name")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="strategy config field")
    p.add_argument("--seed", type=non_negative_int, default=0)
    _add_model_arguments(p)
    p.add_argument("-o", "--output", help="write the report as JSON (an existing file is refused "
                                          "unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("suites", help="list LIBERO suites (with a name: its tasks)")
    p.add_argument("suite", nargs="?", help="a suite to list the tasks of")
    p.set_defaults(func=cmd_suites)

    p = sub.add_parser(
        "demos", help="generate scripted-expert demonstrations for training the built-in policy",
        description="A privileged-pose expert solves each task from initial states sampled by env seed "
                    "(never the official eval init states), with noise on the executed actions. One "
                    "file per demo: re-running resumes. Needs the libero extra.")
    p.add_argument("--config", help="DemoConfig file (YAML/JSON); flags override it")
    p.add_argument("--suite", help="LIBERO suite (default libero_object)")
    p.add_argument("--tasks", type=int, nargs="+", help="task ids (default: every task)")
    p.add_argument("--per-task", type=int, help="successful demos per task (default 40)")
    p.add_argument("--noise", type=float, help="std of the executed-action noise (default 0.3)")
    p.add_argument("--render-every", type=int, help="keep camera frames every k-th step (default 3)")
    p.add_argument("--workers", type=int, help="parallel processes (default 2)")
    p.add_argument("--seed-offset", type=int, help="shift the env seeds (a different dataset)")
    p.add_argument("-o", "--output", default="data/demos/libero_object",
                   help="dataset directory: new, empty, or a dataset to resume (any other non-empty "
                        "directory is refused)")
    p.set_defaults(func=cmd_demos)

    p = sub.add_parser("train", help="train the built-in policy (MiniOFT) on a demo dataset",
                       description="L1 on 8-step action chunks with augmentation; reproducible "
                                   "from --seed. Writes one safetensors file with the normalisation.")
    p.add_argument("--config", help="TrainConfig file (YAML/JSON); flags override it")
    p.add_argument("--data", help="dataset directory from 'prunebench demos'")
    p.add_argument("--steps", type=int, help="optimiser steps (default 3000)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--threads", type=int, help="torch threads (default 2)")
    p.add_argument("--seed", type=non_negative_int)
    p.add_argument("-o", "--output", required=True,
                   help="weights file (.safetensors; an existing file is refused unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "compare", help="compare strategies against dense: closed-loop LIBERO (--suite) or a stream",
        description="With --suite: every strategy plays the same LIBERO episodes (official init "
                    "states) with the same policy; prints success, mean query latency, speedup vs "
                    "the same-run dense reference and mean visual tokens. Without: a synthetic "
                    "observation stream (latency and action error only).")
    p.add_argument("--strategies", nargs="*", help="names (default: every registered strategy)")
    p.add_argument("--keep-ratio", type=float, default=0.5,
                   help="keep ratio given to strategies that have one (others use their defaults)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    _add_model_arguments(p)
    p.add_argument("-o", "--output", help="JSON file (stream), or a directory for one <strategy>.json "
                                          "each (--suite; default results/compare_<suite>_<time>); "
                                          "an existing file or non-empty directory is refused unless "
                                          "--overwrite")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    g = p.add_argument_group("LIBERO closed loop")
    g.add_argument("--suite", help="LIBERO suite, e.g. libero_object")
    g.add_argument("--tasks", type=int, nargs="+", help="task ids (default: every task)")
    g.add_argument("--episodes", type=int, default=1, help="episodes per task (default 1)")
    g.add_argument("--workers", type=int, default=1, help="episodes in parallel processes")
    g.add_argument("--camera-size", type=int, default=128,
                   help="camera resolution in pixels (default 128; OpenVLA-OFT's eval renders 256)")
    g.add_argument("--render-quality", choices=["stock", "fast"], default="stock",
                   help="fast: no MSAA/reflections/shadows (non-stock, recorded)")
    g.add_argument("--fast-reset", action="store_true", help="hard_reset=False (non-stock, recorded)")
    g = p.add_argument_group("synthetic stream")
    g.add_argument("--queries", type=positive_int, default=24)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "check-oft", help="check that the engine reproduces an OpenVLA-OFT checkpoint's own actions",
        description="Runs the engine's dense layer loop and the checkpoint's own predict_action "
                    "(OpenVLA-OFT's released code, --reference openvla) on the same observations and "
                    "reports the largest difference of the predicted action chunks in the head's "
                    "normalised units. Exit status 1 when it exceeds --tolerance. See docs/gpu.md.")
    p.add_argument("checkpoint", help="checkpoint directory or hub id, e.g. "
                                      "moojink/openvla-7b-oft-finetuned-libero-object")
    p.add_argument("--suite", help="LIBERO suite: picks the norm stats and the observations (first "
                                   "frame of each task); without LIBERO, synthetic frames are used")
    p.add_argument("--device", type=device_arg, default="cuda", help="cuda (default) or cpu")
    p.add_argument("--observations", type=positive_int, default=8, help="how many observations (default 8)")
    p.add_argument("--synthetic", action="store_true", help="synthetic frames even when LIBERO is installed")
    p.add_argument("--reference", choices=["openvla", "adapter"], default="openvla",
                   help="openvla: the checkpoint's own remote code (default; needs --trust-remote-code); "
                        "adapter: our module's LlamaModel.forward (no OFT code needed)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow --reference openvla to run the Python code shipped with the checkpoint")
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="largest accepted difference (default 0.05, for bfloat16 on CUDA, where "
                        "kernels differ; float32 on the CPU agrees far closer)")
    p.add_argument("-o", "--output", help="write the report as JSON (an existing file is refused "
                                          "unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=cmd_check_oft)

    from prunebench.cli.study import add_parsers

    add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with sigterm_interrupts(), releasing():  # releasing: claimed outputs never written are removed
            return args.func(args)
    except PrunebenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: what was finished is already written
        print("\ninterrupted", file=sys.stderr)
        return exit_code(err)


if __name__ == "__main__":
    sys.exit(main())
