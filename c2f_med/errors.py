"""The one exception type for bad input: it names the file and the problem in one line."""

from __future__ import annotations

import os


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
