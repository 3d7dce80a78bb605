"""The Kubeflow pipeline: compiled IR (fan-out, GPU pools, PVC, secrets, caching) and the DVC stage graph."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines import runner

ROOT = Path(__file__).resolve().parents[1]
GPU_EXECUTORS = {"exec-flow-op", "exec-teach-op", "exec-teach-op-2", "exec-teach-op-3", "exec-distill-op"}


@pytest.fixture(scope="module")
def ir(tmp_path_factory):
    path = runner.compile_pipeline(tmp_path_factory.mktemp("ir") / "vidistill.yaml")
    spec, platform = list(yaml.safe_load_all(path.read_text()))
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"], path


def _all_tasks(spec):
    tasks = dict(spec["root"]["dag"]["tasks"])
    for comp in spec["components"].values():
        tasks.update(comp.get("dag", {}).get("tasks", {}))
    return tasks


def test_every_method_runs_through_the_fanout(ir):
    spec, _, _ = ir
    assert spec["root"]["inputDefinitions"]["parameters"]["methods"]["defaultValue"] == ["none", "kd", "d3d", "sd"]
    loops = [c for name, c in spec["components"].items() if name.startswith("comp-for-loop")]
    assert len(loops) == 1
    loop_tasks = loops[0]["dag"]["tasks"]
    assert [t["componentRef"]["name"] for t in loop_tasks.values()] == ["comp-distill-op"]
    # the loop iterates over the pipeline parameter, so a new method needs no DAG edit
    dag_tasks = _all_tasks(spec)
    loop_task = next(t for t in dag_tasks.values() if t.get("parameterIterator"))
    assert "methods" in loop_task["parameterIterator"]["items"]["inputParameter"]


def test_gpu_requests_node_selectors_and_tolerations(ir):
    spec, executors, _ = ir
    deploy = spec["deploymentSpec"]["executors"]
    for name in GPU_EXECUTORS:
        res = deploy[name]["container"]["resources"]
        assert res["accelerator"]["resourceType"] == "nvidia.com/gpu" and res["accelerator"]["resourceCount"] == "1"
        assert res["cpuRequest"] and res["memoryRequest"] and res["cpuLimit"] and res["memoryLimit"]
        k8s = executors[name]
        assert k8s["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
        assert {"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"} in k8s["tolerations"]
    for name in set(deploy) - GPU_EXECUTORS:
        assert "accelerator" not in deploy[name]["container"].get("resources", {}), name
        assert "nodeSelector" not in executors.get(name, {}), name


def test_every_task_mounts_data_and_reads_mlflow_secret(ir):
    spec, executors, _ = ir
    for name in spec["deploymentSpec"]["executors"]:
        k8s = executors[name]
        assert k8s["pvcMount"][0]["mountPath"] == "/data" and k8s["pvcMount"][0]["constant"] == "vidistill-data"
        envs = {e["envVar"] for s in k8s["secretAsEnv"] for e in s["keyToEnv"]}
        assert {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_PASSWORD"} <= envs
        assert all("password" not in str(e).lower() or "secret" in str(s) for s in k8s["secretAsEnv"] for e in s["keyToEnv"])


def test_caching_is_off_for_side_effect_tasks_and_images_are_ours(ir):
    spec, _, _ = ir
    tasks = _all_tasks(spec)
    for name, task in tasks.items():
        ref = task["componentRef"]["name"]
        if ref in ("comp-register-op", "comp-start-pipeline-run-op", "comp-end-pipeline-run-op", "comp-export-op"):
            assert task["cachingOptions"].get("enableCache", False) is False, name
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images <= {f"{runner_image}" for runner_image in _images()}


def _images():
    from components.image import CPU_IMAGE, CUDA_IMAGE

    return {CPU_IMAGE, CUDA_IMAGE}


def test_parity_gate_guards_registration(ir):
    spec, _, _ = ir
    tasks = _all_tasks(spec)
    cond = [c for n, c in spec["components"].items() if n.startswith("comp-condition")]
    assert len(cond) == 1 and [t["componentRef"]["name"] for t in cond[0]["dag"]["tasks"].values()] == ["comp-register-op"]
    cond_task = next(t for t in tasks.values() if t.get("triggerPolicy", {}).get("condition"))
    assert "export-op" in cond_task["triggerPolicy"]["condition"] and "== true" in cond_task["triggerPolicy"]["condition"]


def test_exit_handler_closes_the_mlflow_run(ir):
    spec, _, _ = ir
    end = [t for t in spec["root"]["dag"]["tasks"].values() if t["componentRef"]["name"] == "comp-end-pipeline-run-op"]
    assert len(end) == 1 and end[0]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"


def test_committed_yaml_is_up_to_date(ir):
    _, _, path = ir
    committed = yaml.safe_load_all((ROOT / "pipelines" / "vidistill.yaml").read_text())
    fresh = yaml.safe_load_all(path.read_text())
    strip = lambda d: {k: v for k, v in d.items() if k != "sdkVersion"}  # noqa: E731
    assert [strip(d) for d in committed] == [strip(d) for d in fresh], "run `vidistill pipeline compile` and commit"


def test_schedule_refuses_five_field_cron():
    from vidistill.config import ConfigError

    with pytest.raises(ConfigError, match="6 fields"):
        runner.schedule("http://127.0.0.1:1", cron="0 2 * * *")


def test_dvc_stages_mirror_the_dag():
    out = subprocess.run([str(Path(sys.executable).parent / "dvc"), "stage", "list"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    stages = {line.split()[0] for line in out.splitlines() if line.strip()}
    from vidistill.config import load_params

    methods = load_params(ROOT / "params.yaml")["pipeline"]["methods"]
    expected = {"prep", "prep_source", "flow", "teach_rgb", "teach_flow", "pretrain", "two_stream"}
    expected |= {f"distill@{m}" for m in methods} | {f"export@{m}" for m in methods}
    assert expected <= stages
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    params = load_params(ROOT / "params.yaml")
    for name, stage in dvc["stages"].items():
        for key in (stage.get("do", stage)).get("params", []):
            node = params
            for part in key.split("."):
                assert part in node, f"dvc stage {name} names params key {key!r} missing from params.yaml"
                node = node[part]
