"""Every registered method through the `distill` stage with the repository's own params.yaml (issue 26).

A method's own tests may write their own params; this one does not. It resolves `params.yaml` exactly as
`vidistill pipeline run --profile tiny` does (`runner.resolve_params`: the checks the pipeline runs before
any task, with every method of the registry in `pipeline.methods`), then calls the `distill` stage the way
the pipeline's `distill_op` does (the `distill` section plus the artefact paths), on tiny real data: prep's
clips of real encoded synthetic videos, their TV-L1 flow, and untrained teachers, encoders and experts of the
right shapes. The tiny profile shortens only the epochs (`distill.train.epochs`, jedi's own `epochs` and
`burn_in`); every other key, the training views (`hflip`, `crop_scale`) and each method's section of
`distill.methods` included, is the repository's. So a method that works only with hand-made params fails here
(before issue 26, jedi: `distill.train.hflip: true` was refused, and with it off `crop_scale: 0.5` cropped a
batch of embeddings).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from helpers_jedi import tiny_experts
from vidistill import stages
from vidistill.config import DistillConfig, FlowConfig, PrepConfig, SynthConfig
from vidistill.flow.params import TVL1Params
from vidistill.data import ClipDataset
from vidistill.distill import list_methods
from vidistill.models import create_model
from vidistill.schema import from_dict, set_dotted
from vidistill.train import save_model
from vidistill_pipeline import runner

ROOT = Path(__file__).resolve().parents[1]
T, S = 4, 32


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Prep's clips (8 classes x 3 videos, 4x32x32), their flow, and every model file or folder a method reads."""
    root = tmp_path_factory.mktemp("repo_params")
    synth = SynthConfig(out=str(root / "raw"), videos_per_class=3, frames=12, width=48, height=36, seed=0)
    prep = PrepConfig(dataset="synthetic", root=synth.out, out=str(root / "clips"), frames=T, stride=2, short_side=S,
                      crop=S, workers=1, synth=synth)
    stages.prep(prep, progress=False, track=False)
    flow = FlowConfig(clips=prep.out, out=str(root / "flow"), device="cpu", batch_size=16, workers=1,
                      tvl1=TVL1Params(nscales=1, warps=1, outer_iterations=1, inner_iterations=2, median_filtering=1))
    stages.flow(flow, progress=False, track=False)
    clips = ClipDataset(prep.out, "train")
    classes, k = clips.classes, clips.num_classes
    models = root / "models"
    paths = {"clips": prep.out, "flow": flow.out}
    torch.manual_seed(0)
    for key, modality in (("teacher_rgb", "rgb"), ("teacher_flow", "flow"), ("pretrained", "rgb")):
        model = create_model("r2plus1d_student", num_classes=k, frames=T, size=S, modality=modality)
        paths[key] = str(save_model(models / f"{key}.pt", model, classes=classes, extra={"modality": modality}))
    vit = create_model("vit_video_tiny", num_classes=k, frames=T, size=S)  # what `teach --pretext mvd` saves
    paths["mvd_encoder"] = str(save_model(models / "mvd.pt", vit, classes=classes, extra={"pretext": "mvd"}))
    # experts of the main dataset (these clips' classes and hash) and of one other dataset
    folder, _ = tiny_experts(root / "experts", classes=(classes, ["x", "y"]), train=(16, 4), test=(8, 2), frames=T, size=S)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["datasets"][0]["data_hash"] = clips.manifest["hash"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    paths["experts"] = str(folder)
    return {"root": root, "paths": paths}


def repo_params(workdir: Path) -> dict:
    """params.yaml as `pipeline run --profile tiny` resolves and checks it, with every registered method in the fan-out."""
    return runner.resolve_params(ROOT / "params.yaml", profile="tiny", workdir=workdir,
                                 overrides={"pipeline.methods": list_methods()})


def test_the_pipeline_check_accepts_every_registered_method_with_the_repository_params(tmp_path):
    params = repo_params(tmp_path)
    assert params["pipeline"]["methods"] == list_methods()
    shipped = runner.resolve_params(ROOT / "params.yaml", workdir=tmp_path)["distill"]
    for key in ("hflip", "crop_scale", "lr", "batch_size"):  # the profile shortens epochs only
        assert params["distill"]["train"][key] == shipped["train"][key]
    assert params["distill"]["methods"].keys() == shipped["methods"].keys()


@pytest.mark.parametrize("method", list_methods())
def test_every_method_distils_with_the_repository_params(method, world, tmp_path):
    params = repo_params(tmp_path)
    data = copy.deepcopy(params["distill"])
    out = tmp_path / method
    # what the pipeline's distill_op passes (artefact paths), and this machine's device
    for key, value in {"method": method, "out": str(out), "train.device": "cpu", **world["paths"]}.items():
        set_dotted(data, key, value)
    cfg = from_dict(DistillConfig, data, where="distill.")
    result = stages.distill(cfg, progress=False, track=False)
    assert result["method"] == method and 0.0 <= result["top1"] <= 1.0
    history = json.loads((out / "history.json").read_text())
    assert history and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert (out / "model.pt").is_file()


def test_d3d_with_the_rgb_teacher_control_reads_no_flow(world, tmp_path):
    """D3D's Table 6 control through the stage with the repository's params: `teacher: rgb` reads
    `teacher_rgb` and no flow folder (here one that does not exist)."""
    data = copy.deepcopy(repo_params(tmp_path)["distill"])
    paths = {**world["paths"], "flow": str(tmp_path / "no_flow"), "teacher_flow": str(tmp_path / "no_teacher.pt")}
    for key, value in {"method": "d3d", "methods.d3d.teacher": "rgb", "out": str(tmp_path / "d3d_rgb"),
                       "train.device": "cpu", **paths}.items():
        set_dotted(data, key, value)
    result = stages.distill(from_dict(DistillConfig, data, where="distill."), progress=False, track=False)
    assert result["method"] == "d3d" and (tmp_path / "d3d_rgb" / "model.pt").is_file()


def test_jedi_on_experts_built_by_the_repository_params(world, tmp_path):
    """The experts stage with params.yaml's `experts` section (its other datasets, the pace encoder as `pretrained`,
    flips and crops; tiny profile: 1 epoch), then jedi through the distill stage on those experts: what the
    pipeline runs for `pipeline.methods: [..., jedi]`."""
    from vidistill.config import ExpertsConfig

    params = repo_params(tmp_path)
    section = copy.deepcopy(params["experts"])
    assert section["pretrained"] and section["train"]["hflip"] and section["train"]["crop_scale"] < 1
    for key, value in {"clips": world["paths"]["clips"], "out": str(tmp_path / "experts"), "embed_batch_size": 8,
                       "pretrained": world["paths"]["pretrained"], "train.device": "cpu"}.items():
        set_dotted(section, key, value)
    manifest = stages.experts(from_dict(ExpertsConfig, section, where="experts."), progress=False, track=False)
    assert manifest["expert_init"] == world["paths"]["pretrained"] and len(manifest["datasets"]) == 3
    data = copy.deepcopy(params["distill"])
    for key, value in {"method": "jedi", "out": str(tmp_path / "jedi"), "train.device": "cpu", **world["paths"],
                       "experts": str(tmp_path / "experts")}.items():
        set_dotted(data, key, value)
    result = stages.distill(from_dict(DistillConfig, data, where="distill."), progress=False, track=False)
    assert result["method"] == "jedi" and (tmp_path / "jedi" / "model.pt").is_file()
