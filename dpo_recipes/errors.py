"""Errors whose message tells the user what to do. The run ends with the message and the error's exit
code, never a traceback; any other exception is a bug and keeps its traceback."""

import os

LAUNCHED = "DPO_LAUNCH"  # set by `dpo_recipes.launch` for its processes: the make variables it ran with


class UserError(Exception):
    """Bad input or a run that cannot go on: the message names the row, field or key and the fix."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """Every problem found in a composed config, reported together."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


class DataError(UserError, ValueError):
    """Unreadable data or no usable rows: the message says which file and why."""


class Unreachable(UserError, ValueError):
    """Not on this machine, and the Hub did not give it (no network, a typo, a gated or private repo)."""


class TooBig(UserError, ValueError):
    """A run predicted not to fit its memory, with the fixes that would."""


class RunError(UserError, ValueError):
    """Not a run that can be used: the message says why and what to do."""


class Stopped(UserError, RuntimeError):
    """Training stopped early (a signal, a non-finite loss); the message says what to do next. Under
    `dpo_recipes.launch` a stopped rank exits 0, so that torch's launcher reports no failure, and the
    launch exits with the code the run's summary gives (launch.outcome)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.code = exit_code

    @property
    def exit_code(self) -> int:
        return 0 if os.environ.get(LAUNCHED) else self.code


def exit_code(err: Exception) -> int | None:
    """The exit code for an error whose message tells the user what to do, or None for a bug."""
    return err.exit_code if isinstance(err, UserError) else None
