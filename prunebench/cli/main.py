"""The ``prunebench`` command line: the top-level parser, ``main()`` and its one-line errors."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from prunebench.cli import compare, libero, models, planning, report, runs, strategies, study
from prunebench.cli.arguments import _Parser
from prunebench.contract.errors import PrunebenchError
from prunebench.runtime.interrupts import exit_code, sigterm_interrupts
from prunebench.runtime.outputs import releasing

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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="prunebench", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Compare visual-token pruning strategies for VLA models on equal terms.")
    sub = parser.add_subparsers(dest="command", required=True)
    strategies.add_parsers(sub)  # plugins, validate
    runs.add_parsers(sub)  # run, replay
    libero.add_parsers(sub)  # suites, demos, train
    compare.add_parsers(sub)  # compare
    models.add_parsers(sub)  # check-oft
    study.add_parsers(sub)  # study, plot
    planning.add_parsers(sub)  # plan-episodes
    report.add_parsers(sub)  # report
    return parser


def main(argv: list[str] | None = None) -> int:
    from prunebench.plugins.manager import using_plugins

    args = build_parser().parse_args(argv)
    try:
        # releasing: claimed outputs never written are removed; using_plugins: --plugin files and
        # modules registered, and in PRUNEBENCH_PLUGIN_FILES for the worker processes, until the end
        with sigterm_interrupts(), releasing(), using_plugins(getattr(args, "plugin", None)):
            return args.func(args)
    except PrunebenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: what was finished is already written
        print("\ninterrupted", file=sys.stderr)
        return exit_code(err)
    except BrokenPipeError:  # the reader went away (`prunebench plugins | head`): stop quietly, as
        # a shell tool does; stdout goes to /dev/null so that the exit's flush cannot raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
