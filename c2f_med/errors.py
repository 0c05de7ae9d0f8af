"""The one exception type for bad input: it names the file and the problem in one line."""

from __future__ import annotations

import os
import sys
from types import TracebackType


class InputError(Exception):
    """Bad user input (missing file, corrupt scan, mismatched mask, ...).

    ``str(err)`` is a single line ``"<path>: <problem>"`` that the CLI prints without a traceback.
    """

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(problem if self.path is None else f"{self.path}: {problem}")


def find_input_error(exc: BaseException) -> InputError | None:
    """The :class:`InputError` behind ``exc``, if any.

    MONAI's ``Compose`` and datasets re-raise a transform's exception as ``RuntimeError`` with the
    original as ``__cause__``; this walks that chain.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, InputError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def report_input_errors() -> None:
    """Make an uncaught :class:`InputError` (also when MONAI wrapped it) end the program with its one line.

    For runners that are not the project's CLI, such as ``python -m monai.bundle run``: the bundle's
    ``initialize`` list calls this, so a missing datalist or a corrupt scan prints ``error: <file>:
    <problem>`` and exits with status 2 instead of a multi-screen traceback. Other exceptions keep
    Python's default report.
    """
    default = sys.excepthook

    def hook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        err = find_input_error(exc)
        if err is None:
            default(kind, exc, tb)
            return
        print(f"error: {err}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)  # the interpreter would otherwise exit with status 1 after the hook

    sys.excepthook = hook
