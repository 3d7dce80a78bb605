"""The main job as its users run it, without running the pipeline: help for every option, `--set` on
`vidistill pipeline run` (any key of params.yaml, checked before any work), one name for the registered
model, and one-off cluster runs (`--host`) against a stand-in for the Kubeflow Pipelines API server:
no cluster runs here, so `tests/kfp_api_standin.py` answers the REST endpoints that kfp's own client
calls and records what it sent. (The local runs are in tests/test_e2e.py.)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kfp_api_standin import KfpApiStandIn
from vidistill.config import ConfigError, load_params
from vidistill_pipeline import runner

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PARAMS = load_params(ROOT / "params.yaml")


def _cli(*argv: str, cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`vidistill ...` as a user runs it (a process of its own)."""
    return subprocess.run([str(BIN / "vidistill"), *argv], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _main(capsys, monkeypatch, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`vidistill ...` in this process (`vidistill.cli.main`), for speed; same exit codes and output."""
    from vidistill.cli import main

    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out.out, out.err)


def _walk(parser: argparse.ArgumentParser, path: list[str]):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, [*path, name])
        elif not isinstance(action, argparse._HelpAction):
            yield " ".join(path), "/".join(action.option_strings) or action.dest, action.help


def test_every_cli_option_has_a_help_text():
    from vidistill.cli import build_parser

    options = list(_walk(build_parser(), ["vidistill"]))
    assert len(options) > 150  # every stage's generated flags, serve, bench, pipeline, demo
    missing = [f"{cmd} {opt}" for cmd, opt, text in options if not text or text == argparse.SUPPRESS or not text.strip()]
    assert not missing, missing
    assert {("vidistill pipeline run", "--set"), ("vidistill pipeline run", "--host"), ("vidistill demo", "--set"),
            ("vidistill pipeline run", "--wait")} <= {(c, o) for c, o, _ in options}


# ----------------------------------------------------------------------------------------------
# --set


def test_set_reaches_any_key_typed_as_params_yaml_would_be(tmp_path):
    sets = runner.parse_sets(["prep.dataset=folder", f"prep.root={tmp_path}", "distill.methods.kd.tau=2.5",
                              "teach.train.epochs=3", "pipeline.methods=[none, kd]", "register.model_name=my-videos",
                              "pipeline.source_prep.root=/srv/unlabelled", "flow.tvl1.warps=4", "export.atol=1e-3"])
    assert sets["teach.train.epochs"] == 3 and sets["distill.methods.kd.tau"] == 2.5 and sets["pipeline.methods"] == ["none", "kd"]
    params = runner.resolve_params(ROOT / "params.yaml", profile="tiny", workdir=tmp_path / "work", overrides=sets)
    assert params["prep"]["dataset"] == "folder" and params["prep"]["root"] == str(tmp_path)
    assert params["distill"]["methods"]["kd"]["tau"] == 2.5 and params["teach"]["train"]["epochs"] == 3
    assert params["pipeline"]["methods"] == ["none", "kd"] and params["register"]["model_name"] == "my-videos"
    assert params["flow"]["tvl1"]["warps"] == 4 and params["export"]["atol"] == 1e-3
    # paths of the run under the workdir; the user's folders as given; a comma list also names methods
    assert params["prep"]["out"] == str(tmp_path / "work" / "data" / "clips")
    assert params["pipeline"]["source_prep"]["root"] == "/srv/unlabelled"
    assert runner.resolve_params(ROOT / "params.yaml", overrides=runner.parse_sets(["pipeline.methods=none,kd"]),
                                 workdir=tmp_path)["pipeline"]["methods"] == ["none", "kd"]


def test_a_folder_dataset_with_the_synth_block_of_params_yaml_passes_the_check(tmp_path):
    """The bug of issue 17: params.yaml's `prep.synth` block made absolute by the runner, then refused by the
    config check for differing from `prep.root`. Generated videos follow the root they are read from."""
    assert "synth" in PARAMS["prep"] and "synth" in PARAMS["pipeline"]["source_prep"]
    for section in ("prep", "pipeline.source_prep"):
        params = runner.resolve_params(ROOT / "params.yaml", workdir=tmp_path, overrides=runner.parse_sets(
            [f"{section}.dataset=folder", f"{section}.root={tmp_path / 'videos'}"]))
        got = runner._section(params, section)
        assert got["synth"]["out"] == got["root"] == str(tmp_path / "videos")
    # an explicit, different synth.out is still the user's mistake, refused with the config's message
    with pytest.raises(ConfigError, match="differs from prep.root"):
        runner.resolve_params(ROOT / "params.yaml", workdir=tmp_path, overrides=runner.parse_sets(
            [f"prep.root={tmp_path / 'a'}", f"prep.synth.out={tmp_path / 'b'}"]))


@pytest.mark.parametrize("item, message", [
    ("prep.framez=8", "unknown key(s) prep.framez"),
    ("prp.frames=8", "unknown params.yaml section(s) prp"),
    ("distill.methods.kd.tau=-1", "distill.methods.kd.tau must be > 0"),
    ("teach.train.epochs=zero", "epochs must be a int, got 'zero'"),
    ("pipeline.methods=[none, kdd]", "pipeline.methods names unknown method(s) kdd"),
    ("pipeline.model_name=x", "pipeline.model_name is now register.model_name"),
    ("pipeline.source_prep.crop=999", "short_side (64) must be >= prep.crop (999)"),
    ("register.model_name=", "register.model_name must be a non-empty registered-model name"),
    ("prep.frames", "--set takes KEY=VALUE"),
])
def test_a_bad_set_is_refused_in_one_line_before_any_work(item, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    done = _main(capsys, monkeypatch, "pipeline", "run", "--local", "--profile", "tiny", "--params", str(ROOT / "params.yaml"),
                 "--set", item, "--workdir", str(tmp_path), env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"})
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing may start before the check"


def test_a_bad_set_from_the_command_line(tmp_path):
    """The same as a user's process sees it: exit 2, one line on stderr, nothing written."""
    done = _cli("demo", "--profile", "tiny", "--params", str(ROOT / "params.yaml"), "--set", "prep.framez=8",
                "--workdir", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip() == (
        "vidistill demo: error: unknown key(s) prep.framez; valid keys: clips_per_video_test, clips_per_video_train, crop, "
        "dataset, frames, out, root, seed, shard_size, short_policy, short_side, split, stride, synth, test_fraction, workers")
    assert list(tmp_path.iterdir()) == []


def test_one_key_names_the_registered_model():
    """`register.model_name` is the name; the pipeline has no second key for it (nor for the margin)."""
    assert "model_name" not in PARAMS["pipeline"] and "promotion_margin" not in PARAMS["pipeline"]
    assert PARAMS["register"]["model_name"]
    spec = next(yaml.safe_load_all((ROOT / "pipeline.yaml").read_text()))
    root_params = spec["root"]["inputDefinitions"]["parameters"]
    assert "model_name" not in root_params and "promotion_margin" not in root_params and "register_params" in root_params
    register = spec["components"]["comp-register-op"]["inputDefinitions"]["parameters"]
    assert set(register) == {"params", "parent_run_id"}


# ----------------------------------------------------------------------------------------------
# --host: one run on a cluster (stand-in API server)


def test_host_submits_the_compiled_pipeline_with_its_parameters(tmp_path, capsys, monkeypatch):
    token = tmp_path / "token"
    token.write_text("sa-token-from-a-file")
    with KfpApiStandIn(states=["PENDING", "RUNNING", "SUCCEEDED"]) as api:
        done = _main(capsys, monkeypatch, "pipeline", "run", "--host", api.url, "--experiment", "videos", "--run-name",
                     "one-off", "--params", str(ROOT / "params.yaml"), "--set", "register.model_name=my-videos",
                     "--set", "prep.dataset=folder", "--set", "prep.root=/data/videos", "--set", "teach.train.epochs=2",
                     "--wait", "--poll", "0.05", env={"KF_PIPELINES_SA_TOKEN_PATH": str(token)})
        assert done.returncode == 0, done.stdout + done.stderr
        (run,) = api.created_runs()
        (run_id,) = api.runs
        requests = list(api.requests)
    # the run: our pipeline's compiled spec, in the experiment asked for, with the parameters as set
    spec = run["pipeline_spec"]["pipeline_spec"]
    assert spec["pipelineInfo"]["name"] == "vidistill" and "comp-distill-op" in spec["components"]
    assert "kubernetes" in run["pipeline_spec"]["platform_spec"]["platforms"]  # PVC, secrets, node selectors
    assert run["display_name"] == "one-off"
    experiment = next(r for r in requests if r["method"] == "POST" and r["path"].endswith("/experiments"))["body"]
    assert experiment["display_name"] == "videos" and run["experiment_id"]
    given = run["runtime_config"]["parameters"]
    assert given["register_params"]["model_name"] == "my-videos"
    assert given["prep_params"]["dataset"] == "folder" and given["prep_params"]["root"] == "/data/videos"
    assert given["prep_params"]["synth"]["out"] == "/data/videos"  # follows the root (issue 17's bug)
    assert given["teach_params"]["train"]["epochs"] == 2 and given["methods"] == PARAMS["pipeline"]["methods"]
    assert given["prep_params"]["out"] == "data/clips"  # the cluster's paths stay as params.yaml has them
    assert "code_version" not in given  # the image tag compiled in keys the cluster's cache
    # the URL and id printed; the run followed to its end; the credential sent, never printed
    assert f"submitted run {run_id}" in done.stdout and f"{api.url}/#/runs/details/{run_id}" in done.stdout
    assert [s for s in ("PENDING", "RUNNING", "SUCCEEDED") if s in done.stdout] == ["PENDING", "RUNNING", "SUCCEEDED"]
    assert all({k.lower(): v for k, v in r["headers"].items()}.get("authorization") == "Bearer sa-token-from-a-file"
               for r in requests)  # the version check before the submission included
    assert "sa-token-from-a-file" not in done.stdout + done.stderr


def test_host_wait_exits_non_zero_when_the_run_fails(capsys, monkeypatch):
    with KfpApiStandIn(states=["RUNNING", "FAILED"]) as api:
        done = _main(capsys, monkeypatch, "pipeline", "run", "--host", api.url, "--params", str(ROOT / "params.yaml"),
                     "--wait", "--poll", "0.05")
        (run_id,) = api.runs
    assert done.returncode == 1 and f"run {run_id} ended FAILED" in done.stderr, done.stdout + done.stderr
    with KfpApiStandIn(states=["RUNNING"]) as api:  # --timeout: exit 1 with the run's URL
        done = _main(capsys, monkeypatch, "pipeline", "run", "--host", api.url, "--params", str(ROOT / "params.yaml"),
                     "--wait", "--poll", "0.05", "--timeout", "0.2")
        assert done.returncode == 1 and "still RUNNING after 0 s" in done.stderr and api.url in done.stderr
    with KfpApiStandIn(states=["RUNNING"]) as api:  # without --wait: submitted, exit 0, nothing followed
        done = _main(capsys, monkeypatch, "pipeline", "run", "--host", api.url, "--params", str(ROOT / "params.yaml"))
        assert done.returncode == 0 and not [r for r in api.requests if "/runs/" in r["path"]]


def test_host_refuses_a_bad_set_before_contacting_the_server(capsys, monkeypatch):
    with KfpApiStandIn() as api:
        done = _main(capsys, monkeypatch, "pipeline", "run", "--host", api.url, "--params", str(ROOT / "params.yaml"),
                     "--set", "prep.framez=1")
        assert done.returncode == 2 and "unknown key(s) prep.framez" in done.stderr
        assert api.requests == []


def test_local_and_host_are_exclusive_and_one_is_required(capsys, monkeypatch):
    for argv in (["pipeline", "run"], ["pipeline", "run", "--local", "--host", "http://127.0.0.1:1"]):
        done = _main(capsys, monkeypatch, *argv)
        assert done.returncode == 2 and ("one of the arguments --local --host is required" in done.stderr
                                         or "not allowed with argument" in done.stderr), done.stderr


def test_the_demo_note_says_what_the_runs_numbers_say():
    from vidistill_pipeline import demo

    assert demo.demo_note({}, "demo", {"models": [{"role": "student", "method": "kd", "top1": 0.5}]}) == ""  # no none
    data = {"chance": {"top1": 0.125}, "dataset": {"splits": {"test": {"clips": 96}}},
            "models": [{"role": "teacher", "name": "RGB teacher", "top1": 0.875},
                       {"role": "student", "method": "none", "top1": 0.583}, {"role": "student", "method": "kd", "top1": 0.729},
                       {"role": "student", "method": "sd", "top1": 0.24}]}
    params = {"distill": {"student_videos_per_class": 10}}
    note = demo.demo_note(params, "demo", data)
    assert note.startswith("Distillation paid in this run: kd reached top-1 0.729 against 0.583 for none")
    assert "(+0.146)" in note and "The RGB teacher: 0.875 (+0.292 over none)" in note
    assert "students labelled with 10 videos per class" in note and "96 test clips (one clip = 0.010)" in note
    data["models"][1]["top1"] = 0.8  # none above every distilled student: the note must say so
    note = demo.demo_note(params, "demo", data)
    assert note.startswith("No distilled student beat none in this run: the best, kd, reached top-1 0.729 against 0.800")
    assert "paid" not in note

def test_a_local_fanout_shares_the_cores(monkeypatch):
    """kfp.local runs two ParallelFor iterations at once: each student gets its share of the cores (two at torch's
    default thread count on 2 cores ran 7x slower, README "Results on this machine")."""
    import torch

    from vidistill_pipeline import runner

    assert runner.local_parallelism() == 2  # kfp.local's cap in the pinned kfp
    assert [runner.fanout_threads(n, cores=2) for n in (1, 2, 4)] == [2, 1, 1]
    assert runner.fanout_threads(4, cores=16) == 8 and runner.fanout_threads(3, cores=1) == 1
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv(runner.FANOUT_THREADS_ENV, "1")
        runner.apply_fanout_threads()
        assert torch.get_num_threads() == 1
        monkeypatch.delenv(runner.FANOUT_THREADS_ENV)
        torch.set_num_threads(before)
        runner.apply_fanout_threads()  # a cluster pod: nothing set, nothing changed
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)
