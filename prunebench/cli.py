"""The ``prunebench`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from prunebench.errors import PrunebenchError

EPILOG = """examples:
  prunebench compare                       compare the built-in strategies on the built-in model
  prunebench plugins                       list plugins and the strategies they register
  prunebench validate run.yaml             check a run config without running it
  prunebench run --strategy random --set keep_ratio=0.25 --queries 32 -o results.json
"""


def cmd_plugins(args) -> int:
    from prunebench.plugins import MANAGER

    rows = MANAGER.plugins()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        kind = "built-in" if row["builtin"] else row["distribution"]
        print(f"{row['name']}  {row['version']}  ({kind})")
        print(f"    hooks: {', '.join(row['hooks'])}")
        for name in row["strategies"]:
            cls = MANAGER.get(name)
            print(f"    strategy {name}: positions={cls.position_ids}  {(cls.__doc__ or '').strip().splitlines()[0] if cls.__doc__ else ''}")
    return 0


def cmd_validate(args) -> int:
    from prunebench.config import load_run_config
    from prunebench.plugins import MANAGER

    run = load_run_config(args.config)
    strategy = MANAGER.create(run.strategy, run.config)
    print(f"ok: strategy {run.strategy!r} with {strategy.config.model_dump()}")
    return 0


def _engine(model_path, seed):
    from prunebench.engine import PruningEngine
    from prunebench.models import load_model

    model, info = load_model(model_path, seed=seed)
    if not info["trained"]:
        print("note: no trained weights shipped yet; using the randomly initialised built-in model",
              file=sys.stderr)
    return PruningEngine(model), info


def cmd_run(args) -> int:
    from prunebench.config import RunConfig, load_run_config, parse_overrides
    from prunebench.plugins import MANAGER
    from prunebench.results import QuerySummary, RunResults, StrategyInfo, write_json
    from prunebench.runner import run_stream
    from prunebench.streams import SyntheticStream
    from prunebench.versions import environment

    if args.config:
        run = load_run_config(args.config)
    elif args.strategy:
        run = RunConfig(strategy=args.strategy, seed=args.seed, model=args.model)
    else:
        raise PrunebenchError("give --strategy NAME or --config FILE")
    overrides = parse_overrides(args.set)
    strategy = MANAGER.create(run.strategy, {**run.config, **overrides})
    engine, model_info = _engine(run.model, run.seed)
    stream = SyntheticStream(n_queries=args.queries, seed=run.seed,
                             image_size=engine.model.cfg.image_size)
    results = run_stream(engine, strategy, stream, seed=run.seed)
    records = [r.record for r in results]
    out = RunResults(
        command=" ".join(["prunebench"] + sys.argv[1:]), seed=run.seed,
        strategy=StrategyInfo(name=run.strategy, config=strategy.config.model_dump(),
                              position_ids=strategy.position_ids,
                              plugin=MANAGER.strategies()[run.strategy].plugin),
        model=model_info, source=stream.describe(), attention_backend=engine.attention_backend,
        environment=environment(), summary=QuerySummary.of(records), queries=records)
    path = write_json(args.output, out)
    s = out.summary
    print(f"{run.strategy}: {s.n_queries} queries, median {s.latency_ms['total'].median:.2f} ms "
          f"(LLM {s.latency_ms['llm'].median:.2f} ms), mean visual tokens {s.mean_visual_tokens:.1f}, "
          f"LLM FLOPs {s.mean_llm_flops / 1e9:.3f} G (dense {s.dense_llm_flops / 1e9:.3f} G)")
    print(f"wrote {path}")
    return 0


def cmd_compare(args) -> int:
    from prunebench.compare import COMPARISON_COLUMNS, compare_rows, format_table
    from prunebench.plugins import MANAGER
    from prunebench.results import write_json
    from prunebench.runner import run_interleaved
    from prunebench.streams import SyntheticStream
    from prunebench.versions import environment
    from pydantic import BaseModel

    engine, model_info = _engine(args.model, args.seed)
    names = args.strategies or [n for n, r in MANAGER.strategies().items()]
    strategies = {"none": MANAGER.create("none")}
    for name in names:
        if name == "none":
            continue
        fields = MANAGER.get(name).Config.model_fields
        strategies[name] = MANAGER.create(name, {"keep_ratio": args.keep_ratio} if "keep_ratio" in fields else {})
    stream = SyntheticStream(n_queries=args.queries, seed=args.seed, image_size=engine.model.cfg.image_size)
    # warm-up so the first timed queries do not pay one-off allocation costs
    run_interleaved(engine, strategies, SyntheticStream(n_queries=2, seed=args.seed + 1,
                                                        image_size=engine.model.cfg.image_size))
    results = run_interleaved(engine, strategies, stream, seed=args.seed)
    rows = compare_rows(results)
    print(f"{args.queries} queries of a synthetic stream, keep ratio {args.keep_ratio}, model "
          f"{model_info['source']}, backend {engine.attention_backend}, "
          f"{environment()['torch_threads']} threads")
    print(format_table([r.model_dump() for r in rows], COMPARISON_COLUMNS))

    class Comparison(BaseModel):
        command: str
        seed: int
        keep_ratio: float
        model: dict
        attention_backend: str
        environment: dict
        configs: dict
        rows: list

    if args.output:
        write_json(args.output, Comparison(
            command=" ".join(["prunebench"] + sys.argv[1:]), seed=args.seed, keep_ratio=args.keep_ratio,
            model=model_info, attention_backend=engine.attention_backend, environment=environment(),
            configs={n: s.config.model_dump() for n, s in strategies.items()},
            rows=[r.model_dump() for r in rows]))
        print(f"wrote {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prunebench", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Compare visual-token pruning strategies for VLA models on equal terms.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list plugins, their versions, hooks and strategies")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("validate", help="check a run config (YAML/JSON) without running it")
    p.add_argument("config", help="file with 'strategy:' and 'config:' (the strategy's fields)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("run", help="run one strategy over an observation stream, write results JSON")
    p.add_argument("--strategy", help="registered strategy name (see 'prunebench plugins')")
    p.add_argument("--config", help="run config file instead of --strategy")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a strategy config field (repeatable), e.g. --set keep_ratio=0.25")
    p.add_argument("--queries", type=int, default=16, help="queries in the synthetic stream")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="MiniOFT safetensors file (default: the built-in model)")
    p.add_argument("-o", "--output", default="results/results.json", help="results JSON path")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compare", help="compare strategies against dense on the built-in model")
    p.add_argument("--strategies", nargs="*", help="names (default: every registered strategy)")
    p.add_argument("--keep-ratio", type=float, default=0.5, help="keep ratio given to each strategy")
    p.add_argument("--queries", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="MiniOFT safetensors file (default: the built-in model)")
    p.add_argument("-o", "--output", help="also write the table as JSON")
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PrunebenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
