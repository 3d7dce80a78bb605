"""Distributed data parallel under `torchrun` on CPU (gloo): 2 processes against 1, rank-0 outputs, resume.

The worker (`tests/ddp_worker.py`) trains a tiny conv net on learnable synthetic clips through
`vidistill.train.fit` with a `Supervised` task. Three launches are shared by the tests of this file:

* `single`: 1 process, in the test process itself (WORLD_SIZE unset: the path every non-distributed
  run takes; no second interpreter start-up);
* `partial`: `torchrun --nproc_per_node 2`; first checks that a global batch of 15 is refused, then
  trains 3 of 6 epochs (an interruption);
* `resumed`: `torchrun --nproc_per_node 2 ... --resume`, fresh processes finishing epochs 4-6.

Same seed, same initial weights, same global batch (16 = 2 x 8) and same epochs in every launch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ddp_worker import TinyNet, state_checksum, train_and_record
from vidistill.train.loop import load_checkpoint

WORKER = Path(__file__).with_name("ddp_worker.py")
EPOCHS, STOP, BATCH = 6, 3, 16
ACC_TOLERANCE = 0.05
MIN_ACC = 0.9


HANG_SECONDS = 180  # a worker still running after this dumps every thread's stack and exits (see ddp_worker.py)


def _env() -> dict[str, str]:
    launcher = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env["OMP_NUM_THREADS"] = "1"
    env["VIDISTILL_TEST_HANG_SECONDS"] = str(HANG_SECONDS)
    if Path("/sys/class/net/lo").exists():
        # gloo otherwise binds to the address the host name resolves to, which on some CI hosts is not
        # reachable from the host itself; both ranks are on this machine, so loopback is always right
        env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


def _launch(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=HANG_SECONDS + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} still running after {HANG_SECONDS + 60} s:\n{stdout[-3000:]}\n{stderr[-6000:]}")
    print(f"{time.perf_counter() - t0:.1f} s: {' '.join(cmd[1:])}")  # shown with `pytest -s`
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-6000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


def _ranks(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results.glob("rank*.json"))]


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    """Run the three launches once; keep what each left behind (a later launch overwrites `ddp/`)."""
    tmp = tmp_path_factory.mktemp("ddp")
    common = ["--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--seed", "0"]
    out: dict[str, dict] = {}

    assert "WORLD_SIZE" not in os.environ, "run this file with plain pytest, not under torchrun"
    train_and_record(tmp / "single", tmp / "res_single", epochs=EPOCHS, batch_size=BATCH, seed=0)
    out["single"] = {"out": tmp / "single", "ranks": _ranks(tmp / "res_single"),
                     "state": load_checkpoint(tmp / "single" / "checkpoints" / "last.pt")["task"]}

    ddp_out = tmp / "ddp"
    _launch([*_torchrun(2), str(WORKER), "--out", str(ddp_out), "--results", str(tmp / "res_partial"), *common,
             "--stop-after", str(STOP), "--bad-batch", "15"], tmp)
    ckpt = load_checkpoint(ddp_out / "checkpoints" / "last.pt")
    out["partial"] = {"results": tmp / "res_partial", "ranks": _ranks(tmp / "res_partial"), "files": _files(ddp_out),
                      "history": json.loads((ddp_out / "history.json").read_text()), "ckpt_epoch": ckpt["epoch"],
                      "state": ckpt["task"]}

    _launch([*_torchrun(2), str(WORKER), "--out", str(ddp_out), "--results", str(tmp / "res_resumed"), *common,
             "--resume"], tmp)
    ckpt = load_checkpoint(ddp_out / "checkpoints" / "last.pt")
    out["resumed"] = {"ranks": _ranks(tmp / "res_resumed"), "files": _files(ddp_out),
                      "history": json.loads((ddp_out / "history.json").read_text()), "ckpt_epoch": ckpt["epoch"],
                      "state": ckpt["task"]}
    return out


def test_two_processes_reach_the_accuracy_of_one(runs):
    """2 processes x 8 clips and 1 process x 16 clips train to the same held-out accuracy.

    Tolerance: |acc_2proc - acc_1proc| <= 0.05 (10 of 200 held-out clips), both >= 0.9. Each global
    batch holds the same 16 clips in both runs (rank r takes positions r, r+2, ... of the epoch's
    permutation), but the 2-process gradient is the average of two 8-clip means reduced by gloo, so
    the weights agree only up to floating-point summation order, not bit for bit; that slack can
    move a clip near the decision boundary. The weights themselves are also compared, to 1e-4.
    """
    acc_1 = runs["single"]["ranks"][0]["test_acc"]
    acc_2 = runs["resumed"]["ranks"][0]["test_acc"]
    assert runs["single"]["ranks"][0]["world"] == 1 and [r["world"] for r in runs["resumed"]["ranks"]] == [2, 2]
    assert acc_1 >= MIN_ACC and acc_2 >= MIN_ACC, (acc_1, acc_2)
    assert abs(acc_2 - acc_1) <= ACC_TOLERANCE, (acc_1, acc_2)
    single, ddp = runs["single"]["state"], runs["resumed"]["state"]
    assert single.keys() == ddp.keys()
    torch.manual_seed(0)
    init = {f"student.{k}": p.detach() for k, p in TinyNet().named_parameters()}  # what the worker starts from
    for k in init:  # parameters only: the running-mean buffer saw 8-clip batches on each rank
        torch.testing.assert_close(ddp[k], single[k], rtol=0, atol=1e-4, msg=f"{k}: 2-process weights differ from 1-process")
    # the training itself moved the weights (so the comparison above can fail)
    assert max(float((init[k] - single[k]).abs().max()) for k in init) > 0.05


@pytest.mark.parametrize("launch", ["partial", "resumed"])
def test_gradients_are_synchronised_across_ranks(runs, launch):
    """Every rank ends each launch with exactly the weights rank 0 saved (DDP averaged the gradients)."""
    ranks = runs[launch]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    saved = state_checksum(runs[launch]["state"])
    assert [r["checksum"] for r in ranks] == [saved, saved]


def test_frozen_teachers_stay_out_of_ddp_and_checkpoints(runs):
    """Each rank's teacher is built differently on purpose: DDP neither broadcasts it nor syncs its buffers,
    and no checkpoint holds it (a resume rebuilds it, as a distiller reloads its teacher from its file)."""
    for launch in ("partial", "resumed"):
        ranks = runs[launch]["ranks"]
        assert [r["teacher_at_end"] for r in ranks] == [r["teacher_at_start"] for r in ranks]
        assert ranks[0]["teacher_at_start"] != ranks[1]["teacher_at_start"]
        assert runs[launch]["state"] and not any(k.startswith("teachers.") for k in runs[launch]["state"])
    assert "teacher_agreement" in runs["resumed"]["history"][-1]


def test_only_rank_zero_writes_checkpoint_and_history(runs):
    for launch, epochs in (("partial", STOP), ("resumed", EPOCHS)):
        files = runs[launch]["files"]
        assert files == {"checkpoints/last.pt", "history.json"}, f"{launch}: unexpected files {sorted(files)}"
        history = runs[launch]["history"]
        assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
        assert runs[launch]["ckpt_epoch"] == epochs - 1
    assert all(r["history_len"] == EPOCHS for r in runs["resumed"]["ranks"])


def test_resume_under_two_processes_continues_from_rank_zero_checkpoint(runs):
    partial, resumed = runs["partial"], runs["resumed"]
    assert [r["epochs_started"] for r in partial["ranks"]] == [list(range(STOP))] * 2
    assert [r["epochs_started"] for r in resumed["ranks"]] == [list(range(STOP, EPOCHS))] * 2
    assert resumed["history"][:STOP] == partial["history"]  # the earlier epochs come from the checkpoint
    assert resumed["history"][-1]["loss"] < partial["history"][-1]["loss"]
    assert any(not torch.equal(partial["state"][k], resumed["state"][k]) for k in partial["state"])


def test_global_batch_not_divisible_by_world_size_is_refused(runs):
    for r in runs["partial"]["ranks"]:
        assert r["bad_batch_error"] is not None, f"rank {r['rank']}: batch_size 15 was accepted by 2 processes"
        assert "batch_size 15" in r["bad_batch_error"] and "world size 2" in r["bad_batch_error"]
        assert r["group_left_initialised"] is False  # a refused fit leaves no process group behind
    assert not (runs["partial"]["results"] / "bad_out").exists()  # refused before writing anything


def _fake_prep_output(root: Path, *, frames: int = 4, size: int = 16) -> None:
    """A prep output as the data contract describes it: manifest.json + one clip shard per split."""
    classes = ["left", "right"]
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 16), ("test", 8)):
        d = root / split
        d.mkdir(parents=True)
        labels = np.arange(n) % 2
        np.save(d / "clips-00000.npy", rng.integers(0, 256, (n, frames, size, size, 3), dtype=np.uint8))  # (n, T, S, S, 3)
        index = [{"video": f"{classes[y]}/v{i}.mp4", "video_id": i, "label": int(y), "clip": 0, "shard": 0, "offset": i}
                 for i, y in enumerate(labels)]
        (d / "index.json").write_text(json.dumps(index))
        splits[split] = {"clips": n, "videos": n, "per_class": {c: int((labels == k).sum()) for k, c in enumerate(classes)}}
    (root / "manifest.json").write_text(json.dumps({
        "format": 1, "dataset": "fake", "classes": classes, "frames": frames, "size": size, "splits": splits,
        "skipped": [], "params": {"frames": frames, "crop": size}, "sources": {"count": 24, "bytes": 0, "hash": "none"},
        "hash": "fake"}))


@pytest.mark.slow
def test_cli_teach_runs_under_torchrun(tmp_path):
    """`vidistill teach` needs no extra flag under torchrun: `fit` reads the launcher's environment."""
    _fake_prep_output(tmp_path / "clips")
    out = tmp_path / "out"
    _launch([*_torchrun(2), "-m", "vidistill.cli", "teach", "--clips", str(tmp_path / "clips"), "--out", str(out),
             "--model", "r2plus1d_student", "--epochs", "1", "--batch-size", "4", "--no-track", "--quiet",
             "--params", str(tmp_path / "none.yaml")], tmp_path)
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["epoch"] == 0 and len(json.loads((out / "history.json").read_text())) == 1
    model = load_checkpoint(out / "model.pt")
    assert model["name"] == "r2plus1d_student" and model["classes"] == ["left", "right"]
    assert state_checksum(model["state_dict"]) == state_checksum(
        {k.removeprefix("student."): v for k, v in state["task"].items() if k.startswith("student.")})
    assert json.loads((out / "eval" / "metrics.json").read_text())["split"] == "test"
