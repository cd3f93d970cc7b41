"""Exceptions with one-line messages that name the field or plugin at fault.

Every exception here survives pickling (a worker process sends it to the parent unchanged), so a
``--workers N`` run reports the same one line as a one-process run.
"""

from __future__ import annotations

from contextlib import contextmanager


class PrunebenchError(Exception):
    """Base class: the CLI prints these as one line, without a traceback, and exits with
    ``exit_code`` (2: bad input)."""

    exit_code = 2


class PluginError(PrunebenchError):
    """A plugin could not be registered or found."""


class StrategyError(PrunebenchError):
    """A strategy returned something invalid (plan, scores, keep-set), or its own code raised."""

    def __init__(self, strategy: str, message: str):
        super().__init__(f"strategy {strategy!r}: {message}")
        self.strategy, self.message = strategy, message

    def __reduce__(self):  # the default would call StrategyError(full_message): one argument short
        return type(self), (self.strategy, self.message)


class MissingSignal(KeyError):
    """A strategy read a signal its plan did not request (or not yet computed)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class EngineError(PrunebenchError):
    """The engine's own invariants failed (e.g. a plan did not shorten the sequence)."""


class RunAborted(PrunebenchError):
    """A run stopped on errors (the same error in several episodes, every episode errored, a worker
    process died); the episodes finished before are kept in its results file."""

    exit_code = 1


class OutputError(PrunebenchError):
    """Writing an output failed mid-run (disk full, folder made read-only): the file keeps its last
    complete version."""

    exit_code = 1


@contextmanager
def strategy_code(strategy: str, where: str):
    """Run a strategy's own code (schedule, score, select, callbacks): anything it raises becomes
    that strategy's :class:`StrategyError`, naming the strategy, the call, the type and the message."""
    try:
        yield
    except PrunebenchError:
        raise
    except MissingSignal as err:
        raise StrategyError(strategy, f"{where}: {err}") from None
    except Exception as err:  # noqa: BLE001 - a plugin's bug is reported as that plugin's error
        raise StrategyError(strategy, f"{where} raised {type(err).__name__}: {err}") from err
