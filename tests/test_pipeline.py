"""The orchestration: the compiled Kubeflow IR (fan-out, GPU pools, PVC, secrets, caching, typed outputs)
and the generated DVC stage graph (exact params, code and inputs per stage), both checked against
params.yaml and the method registry, never against a literal list of methods.

DVC runs for real (`dvc stage list`, `dvc commit`, `dvc status`); the Kubeflow API server cannot run
here, so the cluster side is checked on the compiled IR.
"""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from vidistill.config import load_params
from vidistill.distill import get_method, list_methods
from vidistill_pipeline import components, dvc, runner, shards

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PARAMS = load_params(ROOT / "params.yaml")
METHODS = PARAMS["pipeline"]["methods"]
GPU_EXECUTORS = {"exec-flow-shard-op", "exec-teach-op", "exec-teach-op-2", "exec-teach-op-3", "exec-distill-op",
                 "exec-experts-op",
                 "exec-method-pretrain-op", "exec-method-pretrain-op-2", "exec-method-pretrain-op-3"}


def _name(component) -> str:
    return "comp-" + component.name.replace("_", "-")


@pytest.fixture(scope="module")
def ir(tmp_path_factory):
    path = runner.compile_pipeline(tmp_path_factory.mktemp("ir") / "pipeline.yaml", params_file=ROOT / "params.yaml")
    spec, platform = list(yaml.safe_load_all(path.read_text()))
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"], path


def _all_tasks(spec):
    tasks = dict(spec["root"]["dag"]["tasks"])
    for comp in spec["components"].values():
        tasks.update(comp.get("dag", {}).get("tasks", {}))
    return tasks


def _container_tasks(spec):
    """Task name -> task, for tasks that run a container; each task's `componentRef.name` without the
    `-2`, `-3` suffix the compiler adds to a component used more than once."""
    import re

    tasks = {}
    for name, task in _all_tasks(spec).items():
        if "dag" not in spec["components"][task["componentRef"]["name"]]:
            tasks[name] = {**task, "componentRef": {"name": re.sub(r"-\d+$", "", task["componentRef"]["name"])}}
    return tasks


# ----------------------------------------------------------------------------------------------
# Kubeflow IR


def test_fanout_defaults_to_params_yaml_methods(ir):
    spec, _, _ = ir
    assert METHODS and set(METHODS) <= set(list_methods())
    assert spec["root"]["inputDefinitions"]["parameters"]["methods"]["defaultValue"] == METHODS
    loops = [c for name, c in spec["components"].items() if name.startswith("comp-for-loop")
             and [t["componentRef"]["name"] for t in c["dag"]["tasks"].values()] == ["comp-distill-op"]]
    assert len(loops) == 1
    iterators = [t["parameterIterator"]["items"] for t in _all_tasks(spec).values() if t.get("parameterIterator")]
    assert sum("methods" in items.get("inputParameter", "") for items in iterators) == 1


def test_fanout_default_follows_params_and_refuses_unknown_methods(tmp_path):
    from vidistill.config import ConfigError
    from vidistill_pipeline.dag import build_pipeline

    params = load_params(ROOT / "params.yaml")
    params["pipeline"]["methods"] = METHODS[-1:]
    spec = build_pipeline(params).pipeline_spec
    assert list(spec.root.input_definitions.parameters["methods"].default_value.list_value) == METHODS[-1:]
    params["pipeline"]["methods"] = [*METHODS, "no-such-method"]
    with pytest.raises(ConfigError, match="unknown method.*no-such-method"):
        build_pipeline(params)


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


def test_every_task_mounts_data_reads_mlflow_config_and_runs_non_root(ir):
    """Issue 25.1: the URI from the ConfigMap k8s/base creates; credentials only from an optional Secret (MLflow
    as deployed has no login, and a required Secret nobody creates kept every pod in CreateContainerConfigError)."""
    spec, executors, _ = ir
    for name in spec["deploymentSpec"]["executors"]:
        k8s = executors[name]
        assert k8s["pvcMount"][0]["mountPath"] == "/workspace" and k8s["pvcMount"][0]["constant"] == "vidistill-data"
        (config,) = k8s["configMapAsEnv"]
        assert config["configMapName"] == "vidistill-mlflow-client" and not config.get("optional")
        assert "MLFLOW_TRACKING_URI" in {e["envVar"] for e in config["keyToEnv"]}
        assert all(s.get("optional") is True for s in k8s["secretAsEnv"]), name
        assert k8s["securityContext"]["runAsNonRoot"] is True and int(k8s["securityContext"]["runAsUser"]) > 0


def test_gpu_type_is_a_setting_of_the_overlay(tmp_path):
    """Issue 25.7: VIDISTILL_GPU_TYPE (an overlay's pipeline.env) sets the node selector's value; a bad one is refused."""
    env = {**os.environ, "VIDISTILL_GPU_TYPE": "nvidia-tesla-a100"}
    out = tmp_path / "a100.yaml"
    subprocess.run([str(BIN / "vidistill"), "pipeline", "compile", "--out", str(out), "--dvc", ""], cwd=ROOT, env=env,
                   check=True, capture_output=True)
    _, platform = list(yaml.safe_load_all(out.read_text()))
    selectors = [e["nodeSelector"]["labels"] for e in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values()
                 if "nodeSelector" in e]
    assert selectors and all(s == {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"} for s in selectors)
    env["VIDISTILL_GPU_TYPE"] = "A100 80GB"
    bad = subprocess.run([str(BIN / "vidistill"), "pipeline", "compile", "--out", str(out), "--dvc", ""], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "VIDISTILL_GPU_TYPE" in bad.stderr and "Traceback" not in bad.stderr


def test_caching_on_for_compute_off_for_side_effects(ir):
    spec, _, _ = ir
    compute = {_name(c) for c in components.COMPUTE + shards.COMPUTE}
    side = {_name(c) for c in components.SIDE_EFFECTS + shards.UNCACHED}
    tasks = _container_tasks(spec)
    seen = set()
    for name, task in tasks.items():
        ref = task["componentRef"]["name"]
        assert ref in compute | side, f"task {name} ({ref}) is neither a compute nor a side-effect component"
        assert task.get("cachingOptions", {}).get("enableCache", False) is (ref in compute), name
        seen.add(ref)
    assert seen == compute | side


def test_cache_keys_change_with_code_and_never_with_the_mlflow_run(ir):
    """A compute task's cache key holds its inputs: the code version, never the per-run MLflow parent."""
    spec, _, _ = ir
    for name, task in _container_tasks(spec).items():
        ref = task["componentRef"]["name"]
        params = task["inputs"].get("parameters", {})
        if ref in {_name(c) for c in components.SIDE_EFFECTS + shards.UNCACHED}:
            continue
        assert "parent_run_id" not in params, f"{name} is cached but takes the per-run MLflow parent"
        if "params" in params:  # every stage that reads params.yaml also takes the code version
            assert params["code_version"]["componentInputParameter"].endswith("code_version"), name
    root_params = spec["root"]["inputDefinitions"]["parameters"]
    assert root_params["code_version"]["defaultValue"] == components.TAG  # the image tag, like the executors' images


def test_outputs_are_typed(ir):
    """Compute components hand on artifacts (metadata, Metrics), not JSON strings; only the parity flag and
    the side effects' ids are parameters."""
    spec, _, _ = ir
    params_out = {name: set(c.get("outputDefinitions", {}).get("parameters", {}))
                  for name, c in spec["components"].items() if "executorLabel" in c}
    assert params_out.pop("comp-export-op") == {"Output"} and params_out.pop("comp-shard-plan-op") == {"Output"}
    assert params_out.pop("comp-register-op") == {"Output"} and params_out.pop("comp-start-pipeline-run-op") == {"Output"}
    assert params_out.pop("comp-not-registered-op") == {"Output"}  # the registration outcome (JSON) for the report
    assert params_out.pop("comp-fingerprint-op") == {"Output"}  # the source videos' fingerprint (prep's cache key)
    assert not any(params_out.values()), params_out
    artifacts = spec["components"]["comp-distill-op"]["outputDefinitions"]["artifacts"]
    assert {k: v["artifactType"]["schemaTitle"] for k, v in artifacts.items()} == {
        "student": "system.Model", "metrics": "system.Metrics", "confusion": "system.ClassificationMetrics"}
    report_in = spec["components"]["comp-report-op"]["inputDefinitions"]["artifacts"]
    assert report_in["students"]["isArtifactList"] and report_in["two_stream"]["artifactType"]["schemaTitle"] == "system.Artifact"
    published = spec["components"]["comp-publish-report-op"]["outputDefinitions"]["artifacts"]
    assert {k: v["artifactType"]["schemaTitle"] for k, v in published.items()} == {  # what the Kubeflow UI shows
        "report": "system.Markdown", "page": "system.HTML"}


def test_prep_and_flow_fan_out_over_shards(ir):
    """prep (CPU) and flow (GPU) run inside fan-outs over the shard numbers the plan task returns;
    the merges collect every shard; `shards` is a pipeline parameter defaulting to params.yaml's."""
    spec, executors, _ = ir
    loops = {tuple(t["componentRef"]["name"] for t in c["dag"]["tasks"].values()): c
             for name, c in spec["components"].items() if name.startswith("comp-for-loop")}
    assert ("comp-prep-shard-op",) in loops and ("comp-flow-shard-op",) in loops
    loop_tasks = [t for t in _all_tasks(spec).values() if t.get("parameterIterator")]
    shard_loops = [t for t in loop_tasks if t["parameterIterator"]["items"].get("inputParameter", "").startswith("pipelinechannel--shard-plan-op")]
    assert len(shard_loops) == 2
    for t in shard_loops:
        assert t["dependentTasks"][0] == "shard-plan-op" or "shard-plan-op" in t["dependentTasks"]
    tasks = _container_tasks(spec)
    merges = {t["componentRef"]["name"]: t for t in tasks.values() if t["componentRef"]["name"] in ("comp-merge-prep-op", "comp-merge-flow-op")}
    assert set(merges) == {"comp-merge-prep-op", "comp-merge-flow-op"}
    for t in merges.values():
        assert t["inputs"]["artifacts"]["parts"]["taskOutputArtifact"]["producerTask"].startswith("for-loop")
    assert spec["root"]["inputDefinitions"]["parameters"]["shards"]["defaultValue"] == PARAMS["pipeline"].get("shards", 1)
    assert "accelerator" in spec["deploymentSpec"]["executors"]["exec-flow-shard-op"]["container"]["resources"]
    assert "accelerator" not in spec["deploymentSpec"]["executors"]["exec-prep-shard-op"]["container"].get("resources", {})


def test_bad_shards_refused_at_build(tmp_path):
    from vidistill.config import ConfigError
    from vidistill_pipeline.dag import build_pipeline

    params = load_params(ROOT / "params.yaml")
    params["pipeline"]["shards"] = 0
    with pytest.raises(ConfigError, match="pipeline.shards must be an integer >= 1"):
        build_pipeline(params)


def test_images_are_ours(ir):
    spec, _, _ = ir
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {components.CPU_IMAGE, components.CUDA_IMAGE}


def test_parity_gate_guards_registration(ir):
    """Registration runs only when parity passed (dsl.If); otherwise (dsl.Else) the outcome says why, and the
    report is published with whichever outcome ran (dsl.OneOf)."""
    spec, _, _ = ir
    cond = {n: [t["componentRef"]["name"] for t in c["dag"]["tasks"].values()]
            for n, c in spec["components"].items() if n.startswith("comp-condition") and "branches" not in n}
    assert sorted(cond.values()) == [["comp-not-registered-op"], ["comp-register-op"]], cond
    conditions = {t["componentRef"]["name"]: t["triggerPolicy"]["condition"] for t in _all_tasks(spec).values()
                  if t.get("triggerPolicy", {}).get("condition")}
    passed = next(c for n, c in conditions.items() if cond.get(n) == ["comp-register-op"])
    failed = next(c for n, c in conditions.items() if cond.get(n) == ["comp-not-registered-op"])
    assert "export-op" in passed and "== true" in passed and failed.startswith("!(") and "== true" in failed
    publish = next(t for t in _all_tasks(spec).values() if t["componentRef"]["name"] == "comp-publish-report-op")
    assert "decision" in publish["inputs"]["parameters"]


def test_exit_handler_closes_the_mlflow_run(ir):
    spec, _, _ = ir
    end = [t for t in spec["root"]["dag"]["tasks"].values() if t["componentRef"]["name"] == "comp-end-pipeline-run-op"]
    assert len(end) == 1 and end[0]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"


def test_committed_pipeline_and_dvc_yaml_are_up_to_date():
    done = subprocess.run([str(BIN / "vidistill"), "pipeline", "compile", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_schedule_refuses_five_field_cron():
    from vidistill.config import ConfigError

    with pytest.raises(ConfigError, match="6 fields"):
        runner.schedule("http://127.0.0.1:1", {}, cron="0 2 * * *")


def test_the_library_never_imports_the_orchestration():
    """`vidistill` reaches `pipeline`/`demo` only through the entry point; no module of it imports this package."""
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "src" / "vidistill").rglob("*.py")
                 if "vidistill_pipeline" in p.read_text() or "import pipelines" in p.read_text()]
    assert not offenders
    code = ("import sys, vidistill.cli as c; c.build_parser(); "
            "assert 'vidistill_pipeline.cli' in sys.modules and 'kfp' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


@pytest.mark.parametrize("argv", [["pipeline", "compile", "--help"], ["demo", "--help"]])
def test_subcommands_work_from_any_directory(argv, tmp_path):
    done = subprocess.run([str(BIN / "vidistill"), *argv], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0 and "usage: vidistill" in done.stdout, done.stderr


def test_the_orchestration_names_no_method():
    """The orchestration (and this test file) take the methods from the registry and params.yaml, never a literal."""
    import re

    files = [*(ROOT / "src" / "vidistill_pipeline").rglob("*.py"), ROOT / "tests" / "test_pipeline.py"]
    pattern = re.compile(r"""["'](%s)["']""" % "|".join(map(re.escape, list_methods())))
    offenders = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in files for m in pattern.finditer(p.read_text())]
    assert not offenders


# ----------------------------------------------------------------------------------------------
# DVC


@pytest.fixture(scope="module")
def dvc_stages():
    """The stages as DVC itself resolves dvc.yaml: name -> (deps, params)."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    out = {}
    with Repo(str(ROOT)) as repo:
        for stage in repo.index.stages:
            deps = [str(Path(d.fs_path).relative_to(ROOT)) for d in stage.deps if not isinstance(d, ParamsDependency)]
            params = sorted(p for d in stage.deps if isinstance(d, ParamsDependency) for p in d.params)
            out[stage.name] = (deps, params)
    return out


def test_dvc_stages_mirror_the_dag():
    out = subprocess.run([str(BIN / "dvc"), "stage", "list", "--name-only"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    expected = {"prep", "prep_source", "flow", "teach_rgb", "teach_flow", "pretrain", "two_stream"}
    expected |= {f"distill@{m}" for m in METHODS} | {f"export@{m}" for m in METHODS}
    expected |= {"experts"} if any("experts" in get_method(m).needs for m in METHODS) else set()  # multi-dataset methods
    assert set(out.split()) == expected


def test_each_student_names_only_its_params_and_its_method_inputs(dvc_stages):
    inputs = dvc._distill_inputs(PARAMS)
    for m in METHODS:
        deps, params = dvc_stages[f"distill@{m}"]
        own = [f"distill.methods.{m}"] if m in PARAMS["distill"]["methods"] else []
        assert set(params) == {"distill.student", "distill.train", *own}, m  # (a repeated key fills a slot)
        cls = get_method(m)
        wanted = {inputs[n] for n in cls.needs} | ({inputs["flow"]} if cls.needs_flow else set()) | {inputs["clips"]}
        assert {d for d in deps if not d.startswith("src/")} == wanted, m


def test_every_stage_lists_the_code_it_runs(dvc_stages):
    for name, (deps, _) in dvc_stages.items():
        code = {d for d in deps if d.startswith("src/")}
        assert {"src/vidistill/stages.py", "src/vidistill/config.py", "src/vidistill/cli.py"} <= code, name
        if name.startswith(("distill@", "teach_", "pretrain", "two_stream")):
            assert {"src/vidistill/data", "src/vidistill/evaluate", "src/vidistill/models", "src/vidistill/train"} <= code, name
        if name.startswith("distill@"):
            assert "src/vidistill/distill" in code
    assert "src/vidistill/data" in dvc_stages["prep"][0] and "src/vidistill/flow" in dvc_stages["flow"][0]
    assert "src/vidistill/export" in dvc_stages[f"export@{METHODS[0]}"][0]


def test_code_deps_follow_imports(tmp_path, monkeypatch):
    """A module that a stage function imports lazily, and what that module imports, are dependencies."""
    pkg = tmp_path / "src" / "vidistill"
    for name, text in {
        "__init__.py": "",
        "cli.py": "from vidistill import config\ndef cmd_prep():\n    from vidistill import stages\ndef cmd_flow():\n    pass\n",
        "config.py": "",
        "stages.py": "import json\nfrom vidistill.config import x\ndef helper():\n    from vidistill.train import fit\n"
                     "def prep():\n    from vidistill.data import run\n    helper()\ndef flow():\n    from vidistill.flow.stage import y\n",
        "data/__init__.py": "from .reader import r\n", "data/reader.py": "from ..models import m\n",
        "models/__init__.py": "", "train/__init__.py": "", "flow/__init__.py": "", "flow/stage.py": "",
        "serve/__init__.py": "",
    }.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    monkeypatch.setattr(dvc, "_package_root", lambda: pkg)
    prefix = "src/vidistill/"
    assert dvc.code_deps("prep", tmp_path) == sorted(prefix + p for p in (
        "__init__.py", "cli.py", "config.py", "data", "models", "stages.py", "train"))
    assert dvc.code_deps("flow", tmp_path) == sorted(prefix + p for p in ("__init__.py", "cli.py", "config.py", "flow", "stages.py"))


def _project_copy(tmp_path: Path) -> Path:
    work = tmp_path / "project"
    work.mkdir()
    for name in ("src", "params.yaml", "dvc.yaml", "pipeline.yaml", ".dvcignore"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / name, **(
            {"ignore": shutil.ignore_patterns("__pycache__", "*.egg-info")} if src.is_dir() else {}))
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=work, check=True)
    return work


def _env(work: Path) -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(work / "src")}


def _dvc_status(work: Path) -> set[str]:
    import json

    out = subprocess.run([str(BIN / "dvc"), "status", "--json"], cwd=work, capture_output=True, text=True, check=True).stdout
    return set(json.loads(out))


def test_dvc_reruns_exactly_what_a_change_touches(tmp_path):
    """Placeholder outputs are committed (`dvc commit`), then one thing changes at a time: `dvc status`
    must mark the stages that read it and no other."""
    work = _project_copy(tmp_path)
    make = textwrap.dedent("""
        from pathlib import Path
        from dvc.repo import Repo
        with Repo(".") as repo:
            for stage in repo.index.stages:
                for out in stage.outs:
                    p = Path(out.fs_path)
                    target = p if p.suffix else p / "placeholder"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(stage.addressing)
        """)
    subprocess.run([sys.executable, "-c", make], cwd=work, check=True)
    subprocess.run([str(BIN / "dvc"), "commit", "--force", "--quiet"], cwd=work, check=True)
    assert _dvc_status(work) == set()

    # one method's hyperparameter: that student only (and, through its model, its export)
    target = next(m for m in METHODS if PARAMS["distill"]["methods"].get(m))
    params = yaml.safe_load((work / "params.yaml").read_text())
    key = next(iter(params["distill"]["methods"][target]))
    params["distill"]["methods"][target][key] = params["distill"]["methods"][target][key] * 2 + 1
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _dvc_status(work) == {f"distill@{target}"}
    from dvc.repo import Repo

    with Repo(str(work)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        (student,) = [s for s in graph if s.name == f"distill@{target}"]
        downstream = {s.name for s in graph.predecessors(student)}
    assert downstream == {f"export@{target}"}
    shutil.copy(ROOT / "params.yaml", work / "params.yaml")

    # one teacher's model file: the students whose method declares it, and no other student
    inputs = dvc._distill_inputs(PARAMS)
    for need in ("teacher_rgb", "teacher_flow", "pretrained"):
        path = work / inputs[need]
        before = path.read_text()
        path.write_text("retrained")
        readers = {f"distill@{m}" for m in METHODS if need in get_method(m).needs}
        assert {s for s in _dvc_status(work) if s.startswith("distill@")} == readers, need
        path.write_text(before)
    assert _dvc_status(work) == set()

    # code: a new module in evaluate/ reruns what evaluates, not prep, flow or export
    (work / "src" / "vidistill" / "evaluate" / "extra.py").write_text("X = 1\n")
    changed = _dvc_status(work)
    assert {"teach_rgb", "teach_flow", "pretrain", "two_stream"} | {f"distill@{m}" for m in METHODS} <= changed
    assert not changed & {"prep", "prep_source", "flow", *(f"export@{m}" for m in METHODS)}


TOY = '''\
"""A toy method registered at test time: KD-like, from the RGB teacher."""

from dataclasses import dataclass

import torch.nn.functional as F

from vidistill.distill.base import Distiller, register_method
from vidistill.train.artifacts import load_model


@dataclass
class ToyParams:
    weight: float = 0.5


@register_method("toy_kd")
class ToyKD(Distiller):
    """Toy KD: cross-entropy plus a weighted logit match with the RGB teacher."""

    Params = ToyParams
    needs = ("teacher_rgb",)

    def __init__(self, student, params, ctx):
        super().__init__(student, params, ctx)
        self.add_teacher("rgb", load_model(ctx.teacher_rgb)[0])

    def forward(self, batch):
        logits, _ = self.student(batch["rgb"])
        t_logits, _ = self.teachers["rgb"](batch["rgb"])
        ce = F.cross_entropy(logits, batch["label"])
        match = (logits - t_logits).pow(2).mean()
        return {"loss": ce + self.params.weight * match, "logits": logits, "ce": ce, "match": match}
'''


def test_a_new_method_reaches_dvc_and_the_fanout(tmp_path):
    """One file and one params.yaml entry; then `vidistill pipeline compile` (which also rebuilds the
    Kubeflow IR) puts it in `dvc stage list` and in the compiled fan-out, with its own inputs only."""
    work = _project_copy(tmp_path)
    (work / "src" / "vidistill" / "distill" / "toy_kd.py").write_text(TOY)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["pipeline"]["methods"].append("toy_kd")
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = _env(work)
    vidistill = [sys.executable, "-m", "vidistill.cli"]

    listed = subprocess.run([*vidistill, "methods"], cwd=work, env=env, capture_output=True, text=True, check=True).stdout
    assert "toy_kd" in listed
    stale = subprocess.run([*vidistill, "pipeline", "compile", "--check"], cwd=work, env=env, capture_output=True, text=True)
    assert stale.returncode == 1 and "pipeline.yaml, dvc.yaml out of date" in stale.stderr, stale.stderr
    subprocess.run([*vidistill, "pipeline", "compile"], cwd=work, env=env, check=True, capture_output=True)

    stages = subprocess.run([str(BIN / "dvc"), "stage", "list", "--name-only"], cwd=work, env=env, capture_output=True,
                            text=True, check=True).stdout.split()
    assert {"distill@toy_kd", "export@toy_kd"} <= set(stages)
    spec = next(yaml.safe_load_all((work / "pipeline.yaml").read_text()))
    assert spec["root"]["inputDefinitions"]["parameters"]["methods"]["defaultValue"] == [*METHODS, "toy_kd"]
    toy = yaml.safe_load((work / "dvc.yaml").read_text())["stages"]["distill"]["foreach"]["toy_kd"]
    assert toy["args"] == " --teacher-rgb runs/teacher_rgb/model.pt" and toy["params"] == "distill.student"
    assert {v for k, v in toy.items() if k.startswith("input")} <= {"runs/teacher_rgb/model.pt", "data/clips"}
    assert toy["code"] == "src/vidistill/distill/toy_kd.py"
