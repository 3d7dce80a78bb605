"""Every mistake a user can make is refused before work, in one line (issue #21, kind 5): the whole
`pipeline` section and every stage section the pipeline runs, registered-model names, cluster settings.
A failing pipeline closes its MLflow parent run as FAILED (kind 1).

The pipeline runs are real `kfp.local` runs with a real `mlflow server`; nothing here talks to a
Kubernetes API (the cluster settings are checked before anything would)."""

from __future__ import annotations

import copy
import json
import sqlite3
from pathlib import Path

import pytest
import yaml
from helpers_runs import ROOT, env, one_line_error, run
from mlflow import MlflowClient
from mlflow_server import student_onnx  # noqa: F401  (fixture: the student exported once per session)

from vidistill import cli
from vidistill.config import ClusterConfig, ConfigError, validate_model_name, validate_pipeline_params
from vidistill.registry.tracking import sqlite_uri

PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def _with(section: str, **values) -> dict:
    params = copy.deepcopy(PARAMS)
    params.setdefault(section, {}).update(values)
    return params


BAD_PIPELINE = [
    ({"methods": []}, "pipeline.methods must be a non-empty list"),
    ({"methods": ["none", "kdd"]}, "unknown method(s) kdd"),
    ({"methods": ["none", "none"]}, "lists none more than once"),
    ({"methods": "none,"}, None),  # a string from the command line: split and accepted
    ({"promotion_margin": 0.1}, "pipeline.promotion_margin is now register.margin"),
    ({"model_name": "vd"}, "pipeline.model_name is now register.model_name"),
    ({"run_name": " "}, "pipeline.run_name must be 1 to 250 characters"),
    ({"methdos": ["none"]}, "unknown key(s) pipeline.methdos"),
    ({"source_prep": {**PARAMS["pipeline"]["source_prep"], "stride": 0}}, "pipeline.source_prep: prep.stride must be >= 1"),
]


@pytest.mark.parametrize("values, message", BAD_PIPELINE, ids=[json.dumps(v)[:40] for v, _ in BAD_PIPELINE])
def test_each_pipeline_value_is_checked_before_any_task(values, message, tmp_path, monkeypatch):
    from vidistill_pipeline.runner import resolve_params

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(_with("pipeline", **values)))
    if message is None:
        assert resolve_params(path, profile="tiny", workdir=tmp_path)["pipeline"]["methods"] == ["none"]
        return
    with pytest.raises(ConfigError) as info:
        resolve_params(path, profile="tiny", workdir=tmp_path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_register_margin_is_typed_as_the_stage_types_it():
    """`margin: 0` (an int in YAML) and a margin given as text are checked as the register stage checks them."""
    validate_pipeline_params(_with("register", margin=0))
    with pytest.raises(ConfigError, match="register.margin must be a float, got 'x'"):
        validate_pipeline_params(_with("register", margin="x"))
    with pytest.raises(ConfigError, match="register.margin must be >= 0"):
        validate_pipeline_params(_with("register", margin=-0.1))


@pytest.mark.parametrize("section, values, message", [
    ("distill", {"train": {"lr": -1}}, "distill: lr must be > 0"),
    ("teach", {"train": {"lr": "inf"}}, "teach: lr must be a finite number"),
    ("pretrain", {"model": "resnet"}, "teach.model 'resnet' is not a registered model"),
    ("register", {"model_name": "a/b"}, "register.model_name 'a/b' has character(s) '/'"),
    ("distill", {"methods": {"kd": {"tau": "hot"}}}, "distill.methods.kd.tau must be a float"),
    ("flow", {"bound": 0}, "flow.bound must be > 0"),
])
def test_every_stage_section_is_checked_before_any_task(section, values, message):
    params = copy.deepcopy(PARAMS)
    for key, value in values.items():
        params[section][key] = {**params[section].get(key, {}), **value} if isinstance(value, dict) else value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_pipeline_params(params)


def test_a_bad_pipeline_value_stops_the_command_before_prep_with_no_mlflow_run(tmp_path, monkeypatch, capsys):
    """The whole `vidistill pipeline run --local` path: one line, exit 2, no task ran (no data, no kfp
    outputs) and no MLflow parent run was opened (so none is left RUNNING)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(_with("pipeline", methods=[])))
    code = cli.main(["pipeline", "run", "--local", "--profile", "tiny", "--params", str(bad), "--workdir", str(tmp_path)])
    line = one_line_error(capsys.readouterr().err)
    assert code == 2 and "pipeline.methods must be a non-empty list" in line, line
    assert not (tmp_path / "data").exists() and not (tmp_path / "outputs" / "kfp").exists()
    db = tmp_path / "mlflow.db"
    if db.exists():
        with sqlite3.connect(db) as con:
            assert con.execute("SELECT COUNT(*) FROM runs").fetchone() == (0,)


def test_a_failing_pipeline_closes_its_parent_run_as_failed(tmp_path, monkeypatch):
    """A task fails at run time (prep finds no class folders under an existing, empty root): the exit
    handler closes the pipeline's MLflow parent run as FAILED, and no run is left RUNNING."""
    from vidistill_pipeline.runner import PipelineFailed, local_tracking, resolve_params, run_local

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    empty = tmp_path / "videos"
    empty.mkdir()
    params = copy.deepcopy(PARAMS)
    for prep in (params["prep"], params["pipeline"]["source_prep"]):
        prep.pop("synth", None)
        prep.update(dataset="folder", root=str(empty))
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with local_tracking(tmp_path):
        with pytest.raises(PipelineFailed):
            run_local(resolve_params(path, profile="tiny", workdir=tmp_path), workdir=tmp_path, cache=False)
    c = MlflowClient(sqlite_uri(tmp_path / "mlflow.db"))
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()])
    parents = [r for r in runs if r.data.tags.get("vidistill.stage") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FAILED", [(r.info.run_name, r.info.status) for r in runs]
    assert not [r for r in runs if r.info.status == "RUNNING"]


# ----------------------------------------------------------------------------------------------
# registered-model names


GOOD_NAMES = ["vidistill-synthetic", "ucf101.r2plus1d_v2", "A", "123", "latest", "x" * 255]
BAD_NAMES = {"vd@x": "'@'", "a/b": "'/'", "a:b": "':'", "my model": "' '", "a?b": "'?'", "a#b": "'#'", "a%20b": "'%'",
             "-a": "first character", "": "non-empty", "é": "'é'", "x" * 256: "at most 255"}


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_an_accepted_name_works_in_every_models_uri_form(name):
    from mlflow.store.artifact.utils.models import _parse_model_uri

    validate_model_name(name)
    for uri in (f"models:/{name}@champion", f"models:/{name}/3", f"models:/{name}/latest", f"models:/{name}/Production"):
        assert _parse_model_uri(uri).name == name, uri


@pytest.mark.parametrize("name, words", BAD_NAMES.items(), ids=[n[:12] or "empty" for n in BAD_NAMES])
def test_a_refused_name_is_named_with_its_character(name, words):
    with pytest.raises(ConfigError) as info:
        validate_model_name(name, "register.model_name")
    if len(name) <= 255:
        assert words in str(info.value), str(info.value)
    assert "register.model_name" in str(info.value)


def test_register_refuses_a_bad_name_before_anything_is_uploaded(tmp_path, monkeypatch, capsys, student_onnx):  # noqa: F811
    """`vidistill register --model-name vd@x` and the library call: refused before a run, an upload or a
    registry entry exists (the store is not even created)."""
    from vidistill.registry.models import register_onnx

    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri(tmp_path / "mlflow.db"))
    onnx_dir = Path(student_onnx["onnx_path"]).parent
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"top1": 0.5, "top5": 1.0, "mAP": 0.5, "data_hash": "d"}))
    for name in ("vd@x", "a/b", "a:b"):
        code = cli.main(["register", "--onnx", str(onnx_dir), "--metrics", str(metrics), "--model-name", name])
        line = one_line_error(capsys.readouterr().err)
        assert code == 2 and f"register.model_name {name!r}" in line, line
        with pytest.raises(ConfigError, match="models:/"):
            register_onnx(student_onnx["onnx_path"], model_name=name, metrics={"top1": 0.5},
                          parity=student_onnx["parity"], data_hash="d", method="none")
    for command in (["promote", "--version", "1"], ["rollback"]):
        assert cli.main([*command, "--model-name", "vd@x"]) == 2
        assert "--model-name 'vd@x'" in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "mlflow.db").exists()


# ----------------------------------------------------------------------------------------------
# cluster settings


@pytest.mark.parametrize("env, message", [
    ({"VIDISTILL_GPU_POOL": "gcp"}, "GPU pool 'gcp' (VIDISTILL_GPU_POOL) is not known; choose one of: gke, aks, eks"),
    ({"VIDISTILL_DATA_PVC": "Data_PVC"}, "the data PVC name (VIDISTILL_DATA_PVC) 'Data_PVC' is not a valid Kubernetes name"),
    ({"VIDISTILL_MLFLOW_SECRET": "mlflow secret"}, "(VIDISTILL_MLFLOW_SECRET) 'mlflow secret' is not a valid Kubernetes"),
    ({"VIDISTILL_DATA_PVC": "-data"}, "is not a valid Kubernetes name"),
    ({"VIDISTILL_DATA_PVC": "d" * 254}, "at most 253 characters"),
])
def test_cluster_settings_are_checked(env, message, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as info:
        ClusterConfig.from_env()
    assert message in str(info.value)
    with pytest.raises(ConfigError):  # and before a local run starts
        validate_pipeline_params(PARAMS)


def test_valid_cluster_settings_and_the_pools_the_dag_knows(monkeypatch):
    from vidistill.config import GPU_POOL_NAMES
    from vidistill_pipeline.dag import GPU_POOLS

    assert tuple(GPU_POOLS) == GPU_POOL_NAMES
    monkeypatch.setenv("VIDISTILL_GPU_POOL", "aks")
    monkeypatch.setenv("VIDISTILL_DATA_PVC", "team-a.videos-01")
    assert ClusterConfig.from_env() == ClusterConfig(gpu_pool="aks", data_pvc="team-a.videos-01")


def test_compiling_for_an_unknown_gpu_pool_is_one_line(tmp_path):
    done = run(tmp_path, "pipeline", "compile", "--params", str(ROOT / "params.yaml"), "--out", str(tmp_path / "p.yaml"),
               "--dvc", "", env=env(VIDISTILL_GPU_POOL="gcp"))
    line = one_line_error(done.stderr)
    assert done.returncode == 2 and "GPU pool 'gcp'" in line and not (tmp_path / "p.yaml").exists(), line
