"""Kubeflow components of the sharded prep and flow (`pipeline.shards`; wired in dag.py).

    shard-plan ──> ParallelFor(shards): prep-shard (CPU) ──> prep (merge) ──> ParallelFor(shards): flow-shard (GPU) ──> tvl1-flow (merge)

The plan task checks `shards` and lists the videos once (the synthetic set is generated there, not
by N shard pods at once). Each shard task is cached and resumable on its own (vidistill.data.shards,
vidistill.flow.shards). The merges write exactly what one unsharded prep and flow write, so every
later task, cache key and data hash is the same for any number of shards; their outputs (`clips`,
`flow`) carry the metadata `prep_op` gives, and the flow stage's (pairs, pairs/s, failed clips).
"""

from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from vidistill_pipeline.components import CPU_IMAGE, CUDA_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def shard_plan_op(params: dict, code_version: str, shards: int) -> List[dict]:
    """Refuse a bad `shards` before work starts, list (and for `synthetic`, generate) the videos once,
    and return the items to fan out over: `{"shard": i, "fingerprint": f}` for i in `[0, shards)`, where
    `f` is the dataset's fingerprint (`Layout.fingerprint`), which keys the prep shards' cache. Never
    cached itself, so new, removed or rewritten videos under the same root reach prep (issue 25.4). (The
    fingerprint travels in the loop items: kfp.local 2.17 replaces any other task output given to a
    ParallelFor body with the loop item.)"""
    from vidistill.config import PrepConfig
    from vidistill.data.layouts import parse_layout
    from vidistill.data.shards import check_shard
    from vidistill.schema import from_dict

    check_shard(0, shards)
    cfg = from_dict(PrepConfig, params, where="prep.")
    cfg.validate()
    layout = parse_layout(cfg)
    fingerprint = layout.fingerprint()
    print(f"shard-plan: {len(layout.items)} videos of {len(layout.classes)} classes over {shards} shard(s), "
          f"fingerprint {fingerprint}")
    return [{"shard": i, "fingerprint": fingerprint} for i in range(shards)]


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def fingerprint_op(params: dict) -> str:
    """The dataset's fingerprint (`Layout.fingerprint`; for `synthetic`, after generating its videos), an
    input of an unsharded prep that keys its cache: never cached itself, so new, removed or rewritten
    videos under the same root reach prep (issue 25.4)."""
    from vidistill.config import PrepConfig
    from vidistill.data.layouts import parse_layout
    from vidistill.schema import from_dict

    cfg = from_dict(PrepConfig, params, where="prep.")
    cfg.validate()
    return parse_layout(cfg).fingerprint()


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def prep_shard_op(params: dict, code_version: str, data_fingerprint: str, shard: int, shards: int, part: Output[Dataset]):
    """Decode the videos of one shard (`vidistill.data.shards.prep_shard`); `part.metadata`: its summary.
    `code_version` and `data_fingerprint` only key the cache."""
    from vidistill.config import PrepConfig
    from vidistill.data.shards import prep_shard
    from vidistill.schema import from_dict

    summary = prep_shard(from_dict(PrepConfig, params, where="prep."), shard=shard, shards=shards, out=part.path)
    part.metadata.update(summary)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def merge_prep_op(params: dict, code_version: str, parts: Input[List[Dataset]], clips: Output[Dataset]):
    """Merge the shards into the clips an unsharded prep writes (`vidistill.data.shards.merge_prep`),
    tracked as the prep stage's MLflow run. `clips.metadata` as `prep_op`'s, plus `shards`."""
    import dataclasses

    import mlflow

    from vidistill.config import PrepConfig
    from vidistill.data.shards import merge_prep
    from vidistill.schema import from_dict
    from vidistill.stages import tracked

    cfg = dataclasses.replace(from_dict(PrepConfig, params, where="prep."), out=clips.path)
    with tracked("prep", cfg) as run:
        summary = merge_prep(cfg, [p.path for p in parts])
        run.log_metrics({f"{s}_clips": float(v["clips"]) for s, v in summary["splits"].items()} |
                        {"skipped": float(len(summary["skipped"])), "shards": float(len(parts))})
    import json
    from pathlib import Path

    manifest = json.loads((Path(clips.path) / "manifest.json").read_text())
    clips.metadata.update({"clips": {k: v["clips"] for k, v in summary["splits"].items()},
                           "skipped": len(summary["skipped"]), "data_hash": manifest.get("hash", "unknown"),
                           "shards": len(parts), "mlflow_run_id": mlflow.last_active_run().info.run_id})


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def flow_shard_op(params: dict, code_version: str, clips: Input[Dataset], shard: int, shards: int, part: Output[Dataset]):
    """TV-L1 flow of one shard's clip files (`vidistill.flow.shards.flow_shard`), on the GPU when the pod has one."""
    from vidistill.config import FlowConfig
    from vidistill.flow.shards import flow_shard
    from vidistill.schema import from_dict

    cfg = from_dict(FlowConfig, {**params, "clips": clips.path, "out": part.path}, where="flow.")
    part.metadata.update(flow_shard(cfg, shard=shard, shards=shards))


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def merge_flow_op(params: dict, code_version: str, clips: Input[Dataset], parts: Input[List[Dataset]],
                  flow: Output[Dataset]):
    """Merge the flow shards into what one flow task writes (`vidistill.flow.shards.merge_flow`), tracked
    as the flow stage's MLflow run. `flow.metadata` as `flow_op`'s (pairs/s over all shards' compute
    time), plus `content_hash` and `shards`."""
    import mlflow

    from vidistill.config import FlowConfig
    from vidistill.flow.shards import merge_flow
    from vidistill.schema import from_dict
    from vidistill.stages import tracked

    cfg = from_dict(FlowConfig, {**params, "clips": clips.path, "out": flow.path}, where="flow.")
    data_hash = clips.metadata.get("data_hash", "unknown")
    seconds = sum(float(p.metadata.get("seconds", 0.0)) for p in parts)
    with tracked("flow", cfg, tags={"data_hash": data_hash}) as run:
        summary = merge_flow(cfg, [p.path for p in parts])
        rate = summary["pairs"] / seconds if seconds > 0 else 0.0
        run.log_metrics({"pairs": float(summary["pairs"]), "failed": float(summary["failed"]), "pairs_per_s": rate,
                         "shards": float(len(parts))})
    flow.metadata.update({"pairs": summary["pairs"], "pairs_per_s": round(rate, 3), "failed": summary["failed"],
                          "content_hash": summary["content_hash"], "shards": len(parts), "data_hash": data_hash,
                          "mlflow_run_id": mlflow.last_active_run().info.run_id})


COMPUTE = (prep_shard_op, merge_prep_op, flow_shard_op, merge_flow_op)  # cached
UNCACHED = (shard_plan_op, fingerprint_op)  # cheap, and they must see the videos as they are now
