"""The console of a local pipeline run: a line per task as it starts and ends, each task's output in its
own log file, and on a failure the failed task's last lines and the path of its log.

How kfp.local (2.17) reports a task, read from its source (kfp/local/):
- `SubprocessRunner` starts each task as a subprocess with stdout and stderr on one pipe, and copies it
  line by line with `print()` (`subprocess_task_handler.run_local_subprocess`);
- the "Executing task", "Streamed logs" and "outputs" messages go through the root logger to the
  `sys.stdout` of the moment (`logging_utils.local_logger_context`);
- settings without a local effect (resources, display names) and the image's name are reported with
  `warnings.warn` (`task_executor._warn_local_only_noops`, `SubprocessTaskHandler.validate_image`);
- each of these happens in the thread that runs the task: the main thread, or one of the two worker
  threads of a `dsl.ParallelFor`.

So `TaskConsole`, for the duration of one run:
- wraps `kfp.local.orchestrator.task_executor.execute_single_task` (one call per container task, with
  its name and spec) to know which task each thread runs, to time it and to print its start and end;
- wraps `task_dispatcher.run_single_task_implementation` to tell a task that ran from one that came
  from kfp.local's cache;
- replaces `sys.stdout`/`sys.stderr` with a stream that writes to the log file of the task the current
  thread runs, and what kfp prints outside any task (its banner) to `pipeline.log`;
- shows every kfp.local warning ("always"), so each task's log holds its own.
The console itself writes to the real stdout, taken before the swap.
"""

from __future__ import annotations

import builtins
import io
import re
import sys
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

from rich.markup import escape

TAIL_LINES = 30  # lines of a failed task's log shown on the console
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_EXCEPTION = re.compile(r"^\s*[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*:")


@dataclass
class TaskRecord:
    """One task of the run, as the console saw it."""

    label: str  # display name, with the ParallelFor item for fan-out tasks: `distill[kd]`
    log: Path
    started: float
    seconds: float = 0.0
    status: str = "running"  # running | done | cached | FAILED
    summary: str = ""
    last_line: str = ""
    outputs: dict[str, Any] = field(default_factory=dict)

    def tail(self, n: int = TAIL_LINES) -> list[str]:
        """The last `n` lines of the task's log that say something (trailing blank and rule lines dropped)."""
        if not self.log.exists():
            return []
        with self.log.open(errors="replace") as fh:
            lines = [line.rstrip() for line in fh]
        while lines and not lines[-1].strip(" -"):
            lines.pop()
        return lines[-n:]

    def error(self) -> str:
        """The last exception line of the task's log (`module.SomeError: message`), or ""."""
        for line in reversed(self.tail(200)):
            if _EXCEPTION.match(line):
                return line.strip()
        return ""


class _Router(io.TextIOBase):
    """A text stream that writes to the log of the task the current thread runs, else to `fallback`."""

    def __init__(self, owner: "TaskConsole", fallback: Callable[[str], None]) -> None:
        super().__init__()
        self._owner = owner
        self._fallback = fallback

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:  # tasks' output is a log, never a terminal
        return False

    def write(self, text: str) -> int:
        task = getattr(self._owner._local, "task", None)
        if task is None:
            self._fallback(text)
        else:
            self._owner._write_task(task, text)
        return len(text)

    def flush(self) -> None:
        pass


class TaskConsole:
    """Context manager around one `kfp.local` pipeline call (see the module docstring).

    Args:
        console: the `rich.console.Console` the task lines go to (the real stdout by default).
        summarise: `(label, outputs) -> str`, a short summary of a finished task from its outputs.

    Attributes:
        tasks: every task started, in start order.
        run_dir: the run's folder under the pipeline root (known once the first task starts).
    """

    def __init__(self, pipeline_root: str | Path, *, console: Any = None,
                 summarise: Callable[[str, dict[str, Any]], str] | None = None) -> None:
        from rich.console import Console

        self.pipeline_root = Path(pipeline_root)
        self.console = console or Console(file=sys.stdout, highlight=False)  # a fixed file: never the router
        self.summarise = summarise or (lambda label, outputs: "")
        self.tasks: list[TaskRecord] = []
        self.run_dir: Path | None = None
        self._local = threading.local()
        self._lock = threading.RLock()
        self._pending: list[str] = []  # kfp's own lines before the run's folder is known
        self._files: dict[int, TextIO] = {}
        self._live: Any = None

    # -- files

    @property
    def log_dir(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / "logs"

    def _pipeline_log(self, text: str) -> None:
        with self._lock:
            if self.log_dir is None:
                self._pending.append(text)
                return
            self._write_path(self.log_dir / "pipeline.log", text)

    def _write_path(self, path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as fh:
            fh.write(_ANSI.sub("", text))

    def _write_task(self, task: TaskRecord, text: str) -> None:
        clean = _ANSI.sub("", text)
        with self._lock:
            fh = self._files.get(id(task))
            if fh is None:
                fh = self._files[id(task)] = task.log.open("a")
            fh.write(clean)
            fh.flush()
            lines = [s.strip() for s in clean.splitlines() if s.strip()]
            if lines:
                task.last_line = lines[-1]

    # -- the wrapped kfp.local calls

    def _label(self, task_name: str, task_spec: Any, io_store: Any) -> str:
        label = task_spec.task_info.name or task_name
        try:
            from kfp.local.orchestrator.orchestrator_utils import OrchestratorUtils

            args = OrchestratorUtils.make_task_arguments(task_inputs_spec=task_spec.inputs, io_store=io_store)
            item = args.get("method")
            if isinstance(item, str):
                label = f"{label}[{item}]"
        except Exception:  # the label is cosmetic; kfp raises the real error when the task runs
            pass
        with self._lock:
            taken = {t.label for t in self.tasks}
            base, n = label, 2
            while label in taken:
                label, n = f"{base}-{n}", n + 1
        return label

    def _start(self, label: str, pipeline_resource_name: str) -> TaskRecord:
        with self._lock:
            if self.run_dir is None:
                self.run_dir = self.pipeline_root / pipeline_resource_name.split("/")[0]
                self.log_dir.mkdir(parents=True, exist_ok=True)
                if self._pending:
                    self._write_path(self.log_dir / "pipeline.log", "".join(self._pending))
                    self._pending.clear()
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-")
            record = TaskRecord(label=label, log=self.log_dir / f"{safe}.log", started=time.perf_counter())
            self.tasks.append(record)
        self.console.print(f"  [cyan]▶[/] {escape(f'{label:<26}')} started", soft_wrap=True)
        return record

    def _end(self, record: TaskRecord, ok: bool, cached: bool, outputs: dict[str, Any]) -> None:
        record.seconds = time.perf_counter() - record.started
        record.outputs = outputs if ok else {}
        record.status = "FAILED" if not ok else ("cached" if cached else "done")
        with self._lock:
            fh = self._files.pop(id(record), None)
            if fh is not None:
                fh.close()
        if not ok:
            self.console.print(f"  [bold red]✗ {escape(f'{record.label:<26}')} FAILED[/] {record.seconds:7.1f} s   "
                               f"log: {escape(str(record.log))}", soft_wrap=True)
            return
        try:
            record.summary = self.summarise(record.label, outputs) or ""
        except Exception as exc:  # a summary never fails a run
            record.summary = f"(no summary: {exc})"
        word = "cached" if cached else "done  "
        self.console.print(f"  [green]✓[/] {escape(f'{record.label:<26}')} {word} {record.seconds:7.1f} s   "
                           f"{escape(record.summary)}".rstrip(), soft_wrap=True)

    def _execute_single_task(self, original: Callable[..., Any]) -> Callable[..., Any]:
        from kfp.local import status

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            task_name = kwargs.get("task_name", args[0] if args else "")
            task_spec = kwargs.get("task_spec", args[1] if len(args) > 1 else None)
            label = self._label(task_name, task_spec, kwargs.get("io_store"))
            record = self._start(label, kwargs.get("pipeline_resource_name", ""))
            self._local.task, self._local.ran = record, False
            outputs, task_status = {}, status.Status.FAILURE
            try:
                outputs, task_status = original(*args, **kwargs)
            except BaseException:
                self._write_task(record, _traceback())
                raise
            finally:
                self._local.task = None
                self._end(record, task_status == status.Status.SUCCESS, not self._local.ran, outputs or {})
            return outputs, task_status

        return wrapper

    def _run_single_task(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self._local.ran = True
            return original(*args, **kwargs)

        return wrapper

    # -- live status of the running tasks (terminals only)

    def _running(self) -> Any:
        from rich.spinner import Spinner
        from rich.table import Table
        from rich.text import Text

        table = Table.grid(padding=(0, 1))
        now = time.perf_counter()
        with self._lock:
            running = [t for t in self.tasks if t.status == "running"]
        for t in running:
            table.add_row(Spinner("dots"), Text(f"{t.label:<26}"), f"{now - t.started:6.0f} s", Text((t.last_line or "")[:80]))
        return table

    # -- context

    def __enter__(self) -> "TaskConsole":
        from kfp.local import task_dispatcher
        from kfp.local.orchestrator import task_executor

        self._saved = (sys.stdout, sys.stderr, builtins.print, task_executor.execute_single_task,
                       task_dispatcher.run_single_task_implementation)
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("always", module=r"kfp\.")
        task_executor.execute_single_task = self._execute_single_task(task_executor.execute_single_task)
        task_dispatcher.run_single_task_implementation = self._run_single_task(
            task_dispatcher.run_single_task_implementation)
        sys.stdout = _Router(self, self._pipeline_log)
        sys.stderr = _Router(self, self._pipeline_log)
        if self.console.is_terminal:
            from rich.live import Live

            self._live = Live(get_renderable=self._running, console=self.console, transient=True,
                              refresh_per_second=4, redirect_stdout=False, redirect_stderr=False)
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        from kfp.local import task_dispatcher
        from kfp.local.orchestrator import task_executor

        if self._live is not None:
            self._live.stop()
        # kfp's indented print() is not thread-safe: two ParallelFor tasks can leave it installed
        (sys.stdout, sys.stderr, builtins.print, task_executor.execute_single_task,
         task_dispatcher.run_single_task_implementation) = self._saved
        self._warnings.__exit__(None, None, None)
        with self._lock:
            for fh in self._files.values():
                fh.close()
            self._files.clear()

    @property
    def failed(self) -> list[TaskRecord]:
        return [t for t in self.tasks if t.status == "FAILED"]


def _traceback() -> str:
    import traceback

    return "".join(traceback.format_exc())
