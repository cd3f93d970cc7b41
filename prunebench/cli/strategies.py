"""``prunebench plugins`` and ``prunebench validate``: the registered strategies and run configs."""

from __future__ import annotations

import json

from prunebench.cli.arguments import add_plugin_argument


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
        if row.get("source"):  # --plugin: a file or module of no distribution
            print(f"{row['name']}  ({row['source']} plugin)")
        else:
            kind = "built-in" if row["builtin"] else row["distribution"]
            print(f"{row['name']}  {row['version']}  ({kind})")
        print(f"    hooks: {', '.join(row['hooks'])}")
        for name in row["strategies"]:
            cls = MANAGER.get(name)
            summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            print(f"    strategy {name}: positions={cls.position_ids}  {summary}")
    return 0


def cmd_validate(args) -> int:
    from prunebench.evaluation.config import load_run_config
    from prunebench.plugins.manager import MANAGER

    run = load_run_config(args.config)
    strategy = MANAGER.create(run.strategy, run.config)
    print(f"ok: strategy {run.strategy!r} with {strategy.config.model_dump()}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("plugins", help="list plugins, their versions, hooks and strategies")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_plugin_argument(p)
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("validate", help="check a run config (YAML/JSON) without running it")
    p.add_argument("config", help="file with 'strategy:' and 'config:' (the strategy's fields)")
    add_plugin_argument(p)
    p.set_defaults(func=cmd_validate)
