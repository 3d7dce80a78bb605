"""`pipeline.shards` under the real kfp.local runner: the pipeline's sharded prep and flow
(dag.sharded_prep_flow, the same tasks the full pipeline runs) with shards=1 and shards=2 give clip
and flow outputs with the same content hashes as each other and as the unsharded library stages."""

import dataclasses
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _find_output(run_dir: Path, task: str, name: str) -> Path:
    """An output artifact of a task in a kfp.local run directory (`<run>/<task>/<name>`)."""
    hits = sorted(run_dir.glob(f"**/{task}*/{name}"))
    assert hits, f"no output {name!r} of task {task!r} under {run_dir}"
    return hits[-1]


def test_set_flag_reaches_the_pipeline_arguments(tmp_path):
    from vidistill.config import ConfigError
    from vidistill_pipeline.dag import pipeline_arguments
    from vidistill_pipeline.runner import parse_sets, resolve_params

    overrides = parse_sets(["pipeline.shards=2", "prep.frames=4"])
    assert overrides == {"pipeline.shards": 2, "prep.frames": 4}
    params = resolve_params(ROOT / "params.yaml", profile="tiny", workdir=tmp_path, overrides=overrides)
    args = pipeline_arguments(params)
    assert args["shards"] == 2 and args["prep_params"]["frames"] == 4
    with pytest.raises(ConfigError, match="pipeline.shards must be an integer >= 1"):
        resolve_params(ROOT / "params.yaml", profile="tiny", workdir=tmp_path, overrides=parse_sets(["pipeline.shards=0"]))


@pytest.mark.slow
def test_shards_1_and_2_give_the_same_clips_and_flow(tmp_path, monkeypatch):
    from kfp import dsl, local

    from vidistill.config import PrepConfig
    from vidistill.data import run_prep
    from vidistill.flow.shards import content_hash
    from vidistill.schema import from_dict
    from vidistill_pipeline.dag import sharded_prep_flow
    from vidistill_pipeline.runner import local_tracking, resolve_params

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = resolve_params(ROOT / "params.yaml", profile="tiny", workdir=tmp_path,
                            overrides={"prep.synth.videos_per_class": 3, "prep.shard_size": 4})

    @dsl.pipeline(name="sharded-prep-flow")
    def sharded(prep_params: dict, flow_params: dict, code_version: str, shards: int):
        sharded_prep_flow(prep_params, flow_params, code_version, shards)

    results = {}
    with local_tracking(tmp_path):
        for shards in (1, 2):
            root = tmp_path / f"kfp-{shards}"
            local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True,
                       enable_caching=False)
            sharded(prep_params=params["prep"], flow_params=params["flow"], code_version="test", shards=shards)
            (run,) = [p for p in root.iterdir() if p.is_dir()]
            clips = _find_output(run, "merge-prep-op", "clips")
            flow = _find_output(run, "merge-flow-op", "flow")
            parts = sorted(run.glob("**/prep-shard-op*/part"))
            assert len(parts) == shards, parts
            results[shards] = (json.loads((clips / "manifest.json").read_text())["hash"], content_hash(flow))
    assert results[1] == results[2]
    # and an unsharded prep (the library stage prep_op runs) writes the same clips
    cfg = dataclasses.replace(from_dict(PrepConfig, params["prep"]), out=str(tmp_path / "direct"))
    run_prep(cfg, progress=False)
    assert json.loads((tmp_path / "direct" / "manifest.json").read_text())["hash"] == results[1][0]
