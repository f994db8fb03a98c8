"""The library's logger: ``get_logger(__name__)`` in every module.

Messages go, as bare lines, to whatever ``sys.stdout`` is when they are emitted, like the ``print``
calls of Dassl: the run's ``log.txt`` tee (:func:`restore.engine.utils.setup_logger`) records them,
and a DDP rank whose stdout is silenced stays silent. The ``restore`` logger does not propagate to
the root logger; raise its level (``logging.getLogger("restore").setLevel(logging.WARNING)``) to
quieten the library.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["get_logger"]

ROOT = "restore"


class _CurrentStdout(logging.StreamHandler):
    """A StreamHandler bound to the current ``sys.stdout`` at each emit (not the one at creation)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201 - the logging module's own attribute
        return sys.stdout

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def _install() -> logging.Logger:
    root = logging.getLogger(ROOT)
    if not any(isinstance(h, _CurrentStdout) for h in root.handlers):
        handler = _CurrentStdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    return root


def get_logger(name: str) -> logging.Logger:
    """The logger ``name`` under the library's ``restore`` logger (plugins pass their ``__name__`` too)."""
    _install()
    return logging.getLogger(name if name == ROOT or name.startswith(ROOT + ".") else f"{ROOT}.{name}")
