"""Checkpoint and model files: whole-or-nothing writes, reads that name a broken file, and the resume check.

A per-epoch checkpoint (`<out>/checkpoints/last.pt`) records, besides the weights and optimiser
state, the *fingerprint* of the run that made it: the content hash of the clips (and of the flow's
settings when the task reads flow), the class list, the model preset and its builder arguments, the
method and its hyperparameters, the content hash of every teacher file, and the version of the
library's code. `plan_resume` compares it, and the training settings, with the run about to start:

* `--resume` (strict) continues only when every one that changes the weights matches, and otherwise
  stops with one line naming what differs. Settings that cannot change the result do not block:
  `num_workers`, and the device as long as it resolves to the same kind (`auto` on a CPU machine is
  `cpu`). A code change does not block either (resuming after a fix is what `--resume` is for).
* with `restart_if_stale` (what the DVC stages use), a checkpoint that does not match, one made by
  other code, one whose training had finished, or an unreadable one is set aside and training starts
  over; only an interrupted run of the same data, settings and code is continued. DVC reruns a stage
  only when something it depends on changed, so this never continues from a stale state.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vidistill.errors import CheckpointError, ResumeMismatchError
from vidistill.outputs import atomic_write

if TYPE_CHECKING:
    from vidistill.config import TrainConfig

CHECKPOINT = "last.pt"
# training settings that cannot change the weights: never block a resume
NEUTRAL_SETTINGS = ("num_workers", "device")
# fingerprint keys that block only a DVC rerun (restart_if_stale), not an explicit --resume
SOFT_KEYS = ("code",)


def atomic_save(obj: Any, path: str | Path, *, advice: str = "") -> Path:
    """`torch.save` to a temporary file beside `path`, then rename: a crash or a failed write (full disk,
    file-size limit) never leaves half a file, and the temporary file is removed.

    Raises:
        vidistill.errors.OutputError: the write failed; one line naming `path`, the cause and what to do.
    """
    return atomic_write(path, lambda tmp: torch.save(obj, tmp), advice=advice)


def _advice(path: Path) -> str:
    if path.name == CHECKPOINT:
        return (f"delete {path} and rerun without --resume (training starts over), or restore it from a copy")
    return ("retrain it (`vidistill teach` / `vidistill distill`), restore it (`dvc checkout`), or point to another "
            "model file")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint or model file (`torch.load(weights_only=True)` onto the CPU).

    Raises:
        FileNotFoundError: the file does not exist.
        vidistill.errors.CheckpointError: the file is empty, truncated, corrupt or not a vidistill
            file; one line naming it and what to do.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): it was not written to the end; {_advice(path)}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CheckpointError(f"{path} cannot be read ({first}): the file is truncated or corrupt; {_advice(path)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a vidistill checkpoint; {_advice(path)}")
    return state


def file_sha256(path: str | Path) -> str:
    """Content hash of a file (teacher weights in a fingerprint)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def library_version() -> str:
    """Content hash (16 hex digits) of the vidistill library's Python source: the `code` fingerprint key."""
    import vidistill

    root = Path(vidistill.__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@dataclass
class ResumePlan:
    """What `fit` should do with an existing checkpoint.

    Attributes:
        resume: continue from the checkpoint.
        epochs_done: epochs the checkpoint holds (0 when starting over).
        reason: why training starts over (empty when resuming or when there is no checkpoint).
    """

    resume: bool
    epochs_done: int = 0
    reason: str = ""


def _short(value: Any) -> str:
    if isinstance(value, list):
        text = f"{len(value)}: {', '.join(map(str, value[:4]))}{', ...' if len(value) > 4 else ''}"
    elif isinstance(value, dict):
        text = json.dumps(value, sort_keys=True)
    else:
        text = str(value)
    return text if len(text) <= 48 else text[:45] + "..."


def _device_kind(name: str) -> str:
    """`auto` -> the device type it resolves to here; `cuda:1` -> `cuda` (equivalent devices compare equal)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(name).split(":")[0]


def setting_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Training settings (`TrainConfig` as a dict) that differ and change the weights, as `name (then -> now)`."""
    out = []
    for key in sorted(set(saved) | set(now)):
        if key == "num_workers" or key not in saved or key not in now:
            continue
        a, b = saved[key], now[key]
        if key == "device":
            a, b = _device_kind(a), _device_kind(b)
        if a != b:
            out.append(f"{key} ({_short(a)} -> {_short(b)})")
    return out


def fingerprint_differences(saved: dict[str, Any], now: dict[str, Any], *, soft: bool) -> list[str]:
    """Fingerprint entries that differ, as `name (checkpoint X, now Y)`; `soft` keys count only when `soft`."""
    out = []
    for key in sorted(set(saved) & set(now)):
        if key in SOFT_KEYS and not soft:
            continue
        if saved[key] != now[key]:
            out.append(f"{key} (checkpoint {_short(saved[key])}, now {_short(now[key])})")
    return out


def plan_resume(ckpt_path: str | Path, cfg: TrainConfig, fingerprint: dict[str, Any], *, resume: bool,
                restart_if_stale: bool = False) -> ResumePlan:
    """Decide whether training continues from `ckpt_path`, before any work or tracking starts.

    Args:
        ckpt_path: `<out>/checkpoints/last.pt`.
        cfg: the training settings of the run about to start.
        fingerprint: the run's data, classes, model, method, teachers and code (see the module docstring).
        resume: `--resume` was given.
        restart_if_stale: start over instead of refusing a checkpoint that does not match.

    Returns:
        The plan; `resume=False` with a `reason` when an existing checkpoint is set aside.

    Raises:
        vidistill.errors.ResumeMismatchError: strict resume, and the checkpoint was made with other
            data, classes, model, method, teachers or weight-changing settings (one line naming them).
        vidistill.errors.CheckpointError: strict resume, and the checkpoint cannot be read.
    """
    path = Path(ckpt_path)
    if not resume or not path.exists():
        return ResumePlan(False)
    try:
        state = load_checkpoint(path)
    except CheckpointError as exc:
        if restart_if_stale:
            return ResumePlan(False, reason=f"{exc}".split(";")[0])
        raise
    saved_fp = json.loads(state.get("fingerprint", "{}"))
    diffs = fingerprint_differences(saved_fp, fingerprint, soft=restart_if_stale)
    settings = setting_differences(state.get("config", {}), asdict(cfg))
    if settings:
        diffs.append("training settings " + ", ".join(settings))
    done = int(state.get("epoch", -1)) + 1
    if restart_if_stale:
        if not saved_fp:
            diffs.append("no fingerprint (made by an older version)")
        if done >= cfg.epochs and not diffs:
            return ResumePlan(False, reason=f"{path} holds a finished run of {done} epochs; training again")
        if diffs:
            return ResumePlan(False, reason=f"{path} was made with other " + "; ".join(diffs) + "; starting over")
        return ResumePlan(True, epochs_done=done)
    if diffs:
        raise ResumeMismatchError(f"cannot resume from {path}: it was made with other " + "; ".join(diffs)
                                  + ". Use the data and settings it was made with, or start fresh without --resume")
    return ResumePlan(True, epochs_done=done)
