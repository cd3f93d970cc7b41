"""``prunebench compare``: strategies against dense, in closed loop on LIBERO or on a stream."""

from __future__ import annotations

import sys

from prunebench.cli.arguments import _add_model_arguments, add_plugin_argument, non_negative_int, positive_int
from prunebench.plugins.dense import DENSE
from prunebench.runtime.outputs import OVERWRITE_HELP, claim


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
    from prunebench.evaluation.tables import CLOSED_LOOP_COLUMNS, closed_loop_rows

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
    _print_rows(rows, CLOSED_LOOP_COLUMNS)
    print(f"wrote {out_dir}/<strategy>.json")
    return 0


def cmd_compare(args) -> int:
    if args.suite:
        return cmd_compare_libero(args)
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
            command=" ".join(["prunebench"] + sys.argv[1:]), seed=args.seed, keep_ratio=args.keep_ratio,
            model=model_info, attention_backend=engine.attention_backend, environment=env,
            strategies={n: StrategyInfo.of(n, s).model_dump() for n, s in strategies.items()},
            configs={n: s.config.model_dump() for n, s in strategies.items()},
            rows=[r.model_dump() for r in rows]))
        print(f"wrote {output}")
    return 0


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
