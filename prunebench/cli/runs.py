"""``prunebench run`` and ``prunebench replay``: one strategy in closed loop, on a stream, on recordings."""

from __future__ import annotations

import argparse
import sys

from prunebench.cli.arguments import _add_model_arguments, add_plugin_argument, non_negative_int, positive_int
from prunebench.contract.errors import PrunebenchError
from prunebench.runtime.interrupts import exit_code
from prunebench.runtime.outputs import OVERWRITE_HELP, claim


def cmd_run(args) -> int:
    if args.suite or (args.config and _is_eval_config(args.config)):
        return cmd_run_libero(args)
    return cmd_run_stream(args)


def _is_eval_config(path: str) -> bool:
    from prunebench.runtime.inputs import read_config_file

    return "suite" in read_config_file(path)


def cmd_run_libero(args) -> int:
    from tqdm import tqdm

    from prunebench.evaluation.closed_loop import evaluate, load_eval_config, plan_jobs, print_summary
    from prunebench.runtime.inputs import parse_overrides

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


def cmd_replay(args) -> int:
    from prunebench.cli import arguments  # build_engine looked up when called: tests replace it
    from prunebench.evaluation.contention import summary_line
    from prunebench.evaluation.replay import RecordedStream, replay, stream_files
    from prunebench.evaluation.results import write_json
    from prunebench.plugins.manager import MANAGER
    from prunebench.runtime.inputs import parse_overrides

    strategy = MANAGER.create(args.strategy, parse_overrides(args.set))
    streams = [RecordedStream(p) for p in stream_files(args.streams)]
    output = claim(args.output, "replay", args.overwrite) if args.output else None
    suite = streams[0].header.get("suite") if streams else None  # picks an OFT checkpoint's norm stats
    engine, _ = arguments.build_engine(args.model, args.seed, args.device, suite, args.threads)
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

    from prunebench.cli import arguments  # build_engine looked up when called: tests replace it
    from prunebench.evaluation.config import RunConfig, load_run_config
    from prunebench.evaluation.contention import load_average, of_records, summary_line
    from prunebench.evaluation.results import QuerySummary, RunResults, StrategyInfo, write_json
    from prunebench.evaluation.runner import run_stream
    from prunebench.evaluation.streams import SyntheticStream
    from prunebench.evaluation.versions import environment
    from prunebench.models import model_device
    from prunebench.plugins.manager import MANAGER
    from prunebench.runtime.inputs import parse_overrides

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
    engine, model_info = arguments.build_engine(run.model, run.seed, run.device, threads=args.threads or run.threads)
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


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "run", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="run one strategy: closed-loop LIBERO episodes (--suite) or a synthetic stream",
        description="With --suite: closed-loop LIBERO episodes under OpenVLA-OFT's protocol (official "
                    "init states, 10 wait steps, stock max steps, 8-action chunks open-loop), written "
                    "to a results JSON after every episode. Without: a synthetic observation stream.")
    p.add_argument("--strategy", help="registered strategy name (see 'prunebench plugins')")
    add_plugin_argument(p)
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
    add_plugin_argument(p)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="strategy config field")
    p.add_argument("--seed", type=non_negative_int, default=0)
    _add_model_arguments(p)
    p.add_argument("-o", "--output", help="write the report as JSON (an existing file is refused "
                                          "unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=cmd_replay)
