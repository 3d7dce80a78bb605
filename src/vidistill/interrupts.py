"""Ctrl-C and SIGTERM that end a run cleanly, never in the middle of a write to the tracking store.

The `vidistill` command installs handlers (`install`) that raise `KeyboardInterrupt` (Ctrl-C) or
`vidistill.errors.Terminated` (SIGTERM), so the stage's MLflow run ends KILLED and the command says
how to resume. Raised at an arbitrary point, though, the exception could cut an MLflow write to a
SQLite store in half and leave that process's connection holding the database lock, so that ending
the run fails with "database is locked". Code that writes to the store runs inside `deferred()`: a
signal arriving there is remembered and raised when the block ends.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from vidistill.errors import Terminated

_depth = 0
_pending: type[BaseException] | None = None


def _raise_or_defer(exc: type[BaseException]) -> None:
    global _pending
    if _depth > 0:
        _pending = _pending or exc
        return
    raise exc()


def _on_sigint(signum: int, frame: Any) -> None:
    _raise_or_defer(KeyboardInterrupt)


def _on_sigterm(signum: int, frame: Any) -> None:
    _raise_or_defer(Terminated)


def install() -> Callable[[], None]:
    """Handle SIGINT and SIGTERM as above; returns a function that restores the previous handlers.
    A no-op outside the main thread (where Python cannot set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, _on_sigint),
                signal.SIGTERM: signal.signal(signal.SIGTERM, _on_sigterm)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    return restore


@contextmanager
def deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM (as handled by `install`) until the block ends, then raise them."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    if _depth == 0 and _pending is not None:
        exc, _pending = _pending, None
        raise exc()
