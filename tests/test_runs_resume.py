"""Runs in real use (issue #21, kinds 1-3): killed and resumed training tracked honestly, resume that
checks what it resumes, output folders checked and locked before work, broken files named in one line.

Real `vidistill` processes on real prep output, real signals, the project's own SQLite MLflow store.
The only stand-in is `test_a_full_disk_...`, which makes `torch.save` raise ENOSPC (a full disk cannot be
made here without privileges); the real file-size limit (RLIMIT_FSIZE) covers the same code path.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import stat
import subprocess
from pathlib import Path

import pytest
import torch
from helpers_runs import epochs_logged, one_line_error, run, start, wait_for, write_params
from mlflow import MlflowClient

from vidistill import cli, stages
from vidistill.config import PrepConfig, TeachConfig, from_dict
from vidistill.errors import OutputError
from vidistill.registry.tracking import sqlite_uri
from vidistill.train.checkpoint import atomic_save, load_checkpoint


def _prep(project: Path, out: str, **synth) -> Path:
    params = _tiny_prep()
    params["out"] = str(project / out)
    params["root"] = params["synth"]["out"] = str(project / "data" / "raw" / out.replace("/", "_"))
    params["synth"].update(synth)
    stages.prep(from_dict(PrepConfig, params), progress=False, track=False)
    return project / out


def _tiny_prep() -> dict:
    from helpers_runs import TINY

    return json.loads(json.dumps(TINY["prep"]))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project folder with params.yaml and three prep outputs: `data/clips`, the same classes from other
    videos (`data/clips_other`), and another class set (`data/clips_d1`, 6 classes)."""
    root = tmp_path_factory.mktemp("project")
    write_params(root)
    _prep(root, "data/clips")
    _prep(root, "data/clips_other", seed=7)
    _prep(root, "data/clips_d1", domain=1)
    return root


def _teach_cfg(project: Path, out: Path, **kw) -> TeachConfig:
    data = {"clips": str(project / "data" / "clips"), "out": str(out), "model": "r2plus1d_student",
            "train": {"epochs": 3, "batch_size": 4, "warmup_epochs": 0, "device": "cpu"}}
    for key, value in kw.items():
        (data["train"] if key in ("epochs", "lr", "num_workers", "device") else data)[key] = value
    cfg = from_dict(TeachConfig, data)
    cfg.validate()
    return cfg


def _teach(project: Path, out: Path, *, resume: bool = False, extra: tuple[str, ...] = (),
           capsys=None) -> tuple[int, str, str]:
    """`vidistill teach` in this process (the real CLI code path), untracked; returns (status, stderr, stdout)."""
    argv = ["teach", "--quiet", "--no-track", "--params", str(project / "params.yaml"), "--clips",
            str(project / "data" / "clips"), "--out", str(out), "--epochs", "3", "--device", "cpu", *extra]
    code = cli.main(argv + (["--resume"] if resume else []))
    captured = capsys.readouterr()
    return code, captured.err, captured.out


def _client(project: Path) -> MlflowClient:
    return MlflowClient(sqlite_uri(project / "mlflow.db"))


# ----------------------------------------------------------------------------------------------
# kind 1 (and the lock of kind 3): killed runs, resumed runs, one history


def test_killed_runs_are_closed_and_a_resume_continues_the_same_mlflow_run(project):
    """SIGKILL and SIGTERM mid-training, then `--resume`: the SIGTERM run ends KILLED at once, the SIGKILL
    run is marked KILLED when the next run starts, each resume reopens its run, and every epoch's
    metrics end up once in that one run. A second writer on a folder in use is refused."""
    epochs = "20"
    killed, terminated = project / "runs" / "killed", project / "runs" / "terminated"
    args = ("teach", "--quiet", "--epochs", epochs)
    a = start(project, *args, "--out", str(killed))
    wait_for(lambda: epochs_logged(killed) >= 1, proc=a, what="epoch 1 of the run to kill")
    os.kill(a.pid, signal.SIGSTOP)  # keeps its lock (and its place) while a second writer tries the same folder
    second = run(project, *args, "--out", str(killed))
    assert second.returncode == 2, second.stdout + second.stderr
    line = one_line_error(second.stderr)
    assert str(killed) in line and "being written by another process" in line and f"pid {a.pid}" in line, line
    a.kill()
    a.wait()
    c = start(project, *args, "--out", str(terminated))  # after the kill: a stopped process may hold the store's lock
    wait_for(lambda: epochs_logged(terminated) >= 1, proc=c, what="epoch 1 of the run to terminate")
    c.send_signal(signal.SIGTERM)
    assert c.wait(timeout=300) == 143, Path(c.log).read_text()
    assert "terminated (SIGTERM); rerun with --resume" in Path(c.log).read_text()

    mlflow = _client(project)
    run_k = json.loads((killed / "checkpoints" / "run.json").read_text())["run_id"]
    run_t = json.loads((terminated / "checkpoints" / "run.json").read_text())["run_id"]
    assert mlflow.get_run(run_t).info.status == "KILLED"  # said so on its way out
    # SIGKILL: the process could not say so; the next run (the one just terminated) found it gone
    assert mlflow.get_run(run_k).info.status == "KILLED"
    assert "was gone when a later run started" in mlflow.get_run(run_k).data.tags["vidistill.killed"]
    done_before = {run_k: epochs_logged(killed), run_t: epochs_logged(terminated)}
    first_epoch = json.loads((killed / "history.json").read_text())[0]

    resumed = [start(project, *args, "--resume", "--out", str(out)) for out in (killed, terminated)]
    for proc in resumed:
        assert proc.wait(timeout=600) == 0, Path(proc.log).read_text()[-3000:]
    for proc, run_id in zip(resumed, (run_k, run_t)):
        assert f"{done_before[run_id]} of {epochs} epochs done" in Path(proc.log).read_text()

    for out, run_id in ((killed, run_k), (terminated, run_t)):
        assert json.loads((out / "checkpoints" / "run.json").read_text())["run_id"] == run_id  # the same run
        got = mlflow.get_run(run_id)
        assert got.info.status == "FINISHED"
        assert got.data.tags["vidistill.resumes"] == "1"
        steps = [m.step for m in mlflow.get_metric_history(run_id, "loss")]
        assert sorted(steps) == list(range(1, int(epochs) + 1)), steps  # every epoch, once, in one run
        assert "top1" in got.data.metrics and "mean_class_accuracy" in got.data.metrics
    assert json.loads((killed / "history.json").read_text())[0] == first_epoch  # epoch 1 was not trained again
    runs = mlflow.search_runs([mlflow.get_run(run_k).info.experiment_id])
    assert len(runs) == 2, [r.info.run_id for r in runs]  # no new run for either resume


def test_a_run_whose_process_died_is_marked_killed_when_the_next_run_starts(tmp_path, monkeypatch):
    """A RUNNING run whose process is gone (a real process, killed) becomes KILLED when another stage run
    starts in the experiment; a run whose process lives, and a run without a process tag (a pipeline's
    parent run, closed by its exit handler), stay RUNNING."""
    import psutil

    from vidistill.registry import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri(tmp_path / "mlflow.db"))
    c = tracking.client()
    exp = tracking.experiment_id(c, "t-dead")
    sleeper = subprocess.Popen(["sleep", "60"])
    dead_tag = f"{tracking.socket.gethostname()}|{sleeper.pid}|{psutil.Process(sleeper.pid).create_time():.2f}"
    dead = c.create_run(exp, tags={tracking.PROCESS_TAG: dead_tag}).info.run_id
    alive = c.create_run(exp, tags={tracking.PROCESS_TAG: tracking.process_tag()}).info.run_id
    parent = c.create_run(exp).info.run_id
    sleeper.kill()
    sleeper.wait()
    with tracking.stage_run("next", params={}, experiment="t-dead"):
        pass
    assert c.get_run(dead).info.status == "KILLED"
    assert c.get_run(alive).info.status == "RUNNING" and c.get_run(parent).info.status == "RUNNING"


# ----------------------------------------------------------------------------------------------
# kind 2: resume checks what it resumes


def test_resume_refuses_other_data_classes_model_or_settings_in_one_line(project, tmp_path, capsys):
    out = tmp_path / "t"
    stages.teach(_teach_cfg(project, out), progress=False, track=False, stop_after_epochs=1)
    ckpt = out / "checkpoints" / "last.pt"
    before = ckpt.read_bytes()
    cases = {
        "data_hash": ("--clips", str(project / "data" / "clips_other")),  # prep re-run on other videos
        "classes": ("--clips", str(project / "data" / "clips_d1")),
        "model": ("--model", "r2plus1d_teacher"),
        "lr": ("--lr", "0.01"),
    }
    for names, extra in cases.items():
        code, err, _ = _teach(project, out, resume=True, extra=extra, capsys=capsys)
        assert code == 2, (names, err)
        line = one_line_error(err)
        assert f"cannot resume from {ckpt}" in line and names in line and "without --resume" in line, line
        assert ckpt.read_bytes() == before and not (out / "model.pt").exists()  # nothing trained, nothing saved

    # settings that cannot change the weights do not block: workers, and `auto` on this CPU machine = cpu
    code, err, _ = _teach(project, out, resume=True, extra=("--num-workers", "1", "--device", "auto"), capsys=capsys)
    assert code == 0, err
    assert load_checkpoint(ckpt)["epoch"] == 2 and (out / "model.pt").exists()


def test_resume_for_dvc_starts_over_on_a_stale_checkpoint(project, tmp_path, capsys):
    """`--resume --restart-if-stale` (the DVC stages): other data, or a finished run, starts over instead of
    refusing; an interrupted run of the same data and settings continues."""
    out = tmp_path / "t"
    stages.teach(_teach_cfg(project, out), progress=False, track=False, stop_after_epochs=1)
    code, _, out_lines = _teach(project, out, resume=True, extra=("--restart-if-stale",), capsys=capsys)
    assert code == 0
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 3 and "starting over" not in out_lines
    first = history[0]
    code, _, printed = _teach(project, out, resume=True, capsys=capsys,
                              extra=("--restart-if-stale", "--clips", str(project / "data" / "clips_other")))
    assert code == 0 and "was made with other data_hash" in printed and "starting over" in printed, printed
    assert json.loads((out / "history.json").read_text())[0] != first  # trained again from epoch 1


# ----------------------------------------------------------------------------------------------
# kind 3: files


def test_truncated_or_empty_checkpoint_and_model_files_are_named_in_one_line(project, tmp_path, capsys):
    out = tmp_path / "t"
    stages.teach(_teach_cfg(project, out), progress=False, track=False, stop_after_epochs=1)
    ckpt = out / "checkpoints" / "last.pt"
    data = ckpt.read_bytes()
    for broken, words in ((data[: len(data) // 2], "truncated or corrupt"), (b"", "is empty")):
        ckpt.write_bytes(broken)
        code, err, _ = _teach(project, out, resume=True, capsys=capsys)
        line = one_line_error(err)
        assert code == 2 and str(ckpt) in line and words in line and "without --resume" in line, line

    model = tmp_path / "m" / "model.pt"
    stages.teach(_teach_cfg(project, model.parent, epochs=1), progress=False, track=False)
    good = model.read_bytes()
    for broken, words in ((good[: len(good) // 3], "truncated or corrupt"), (b"", "is empty")):
        model.write_bytes(broken)
        code = cli.main(["evaluate", "--no-track", "--checkpoint", str(model), "--clips", str(project / "data" / "clips"),
                         "--out", str(tmp_path / "eval")])
        line = one_line_error(capsys.readouterr().err)
        assert code == 2 and str(model) in line and words in line and "retrain it" in line, line


def _without_override() -> None:
    """preexec_fn: as root, drop CAP_DAC_OVERRIDE from the bounding set, so the command (after exec) obeys
    file permissions like any user; its other privileges stay."""
    import ctypes

    pr_capbset_drop, cap_dac_override = 24, 1
    if ctypes.CDLL(None, use_errno=True).prctl(pr_capbset_drop, cap_dac_override, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE) failed")


def test_an_unwritable_output_is_refused_before_the_first_epoch(project, tmp_path):
    """A folder the user may not write (mode 0555): the command stops in one line naming it, before any
    training. As root, the command runs without CAP_DAC_OVERRIDE (root may otherwise write anywhere)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    out = locked / "teacher"
    try:
        done = run(project, "teach", "--quiet", "--no-track", "--out", str(out), "--epochs", "2",
                   **({"preexec_fn": _without_override} if os.geteuid() == 0 else {}))
    finally:
        locked.chmod(0o755)
    assert done.returncode == 2, done.stdout + done.stderr
    line = one_line_error(done.stderr)
    assert str(locked) in line and "permission denied" in line and "teach.out" in line, line
    assert not out.exists() and not (project / "history.json").exists()


def test_a_checkpoint_write_that_fails_half_way_names_the_file_and_leaves_no_temporary(project, tmp_path):
    """A real file-size limit (RLIMIT_FSIZE, as `ulimit -f`) below the checkpoint's size: torch.save fails
    part-way; the message names last.pt and the limit, and no `last.pt.tmp<pid>` is left behind."""
    out = tmp_path / "t"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    done = run(project, "teach", "--quiet", "--no-track", "--out", str(out), "--epochs", "2", preexec_fn=limit)
    assert done.returncode == 2, done.stdout + done.stderr
    line = one_line_error(done.stderr)
    assert str(out / "checkpoints" / "last.pt") in line and "file-size limit" in line, line
    assert not [p for p in out.rglob("*") if ".tmp" in p.name], list(out.rglob("*"))


def test_a_full_disk_is_reported_with_the_file_and_free_space(tmp_path, monkeypatch):
    """Stand-in: torch.save writes part of the file, then raises ENOSPC as on a full disk."""

    def full(obj, f) -> None:
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    target = tmp_path / "checkpoints" / "last.pt"
    with pytest.raises(OutputError, match=r"could not write .*last\.pt: no space left on the device \(.* MiB free\)"):
        atomic_save({"epoch": 0}, target)
    assert list(target.parent.iterdir()) == []


def test_the_lock_is_released_when_its_holder_dies(tmp_path):
    """A SIGKILLed holder leaves its lock file, never the lock: the next writer gets it at once."""
    from vidistill.outputs import lock_path, output_lock

    out = tmp_path / "out"
    holder = subprocess.Popen([os.sys.executable, "-c", "import sys, time\nfrom vidistill.outputs import output_lock\n"
                               f"with output_lock({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(OutputError, match=f"pid {holder.pid}"):
        with output_lock(out):
            pass
    holder.kill()
    holder.wait()
    assert lock_path(out).exists()
    with output_lock(out):
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()


# ----------------------------------------------------------------------------------------------
# kind 5 (training): a diverging loss, and --debug


def test_a_diverging_loss_is_one_line_naming_the_epoch_and_what_to_do(project, tmp_path, capsys):
    code, err, _ = _teach(project, tmp_path / "t", extra=("--lr", "1e30"), capsys=capsys)
    line = one_line_error(err)
    assert code == 2 and "loss became non-finite at epoch" in line and "Lower the learning rate (lr 1e+30)" in line, line


def test_debug_shows_the_traceback_of_a_user_error(project, tmp_path, monkeypatch):
    bad = ["teach", "--no-track", "--params", str(project / "params.yaml"), "--epochs", "0"]
    assert cli.main(bad) == 2
    with pytest.raises(Exception, match="epochs must be >= 1"):
        cli.main(["--debug", *bad])
    monkeypatch.setenv("VIDISTILL_DEBUG", "1")
    with pytest.raises(Exception, match="epochs must be >= 1"):
        cli.main(bad)


def test_unwritable_check_names_a_read_only_file_system(tmp_path):
    """`check_writable` on a path below a file (no folder can be made there) refuses in one line."""
    from vidistill.outputs import check_writable

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match=f"cannot write to {blocker / 'sub'}"):
        check_writable(blocker / "sub")
    assert stat.S_ISREG(blocker.stat().st_mode)
