"""Exceptions with one-line messages that name the field or plugin at fault."""


class PrunebenchError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class PluginError(PrunebenchError):
    """A plugin could not be registered or found."""


class StrategyError(PrunebenchError):
    """A strategy returned something invalid (plan, scores, keep-set)."""

    def __init__(self, strategy: str, message: str):
        super().__init__(f"strategy {strategy!r}: {message}")
        self.strategy = strategy


class EngineError(PrunebenchError):
    """The engine's own invariants failed (e.g. a plan did not shorten the sequence)."""
