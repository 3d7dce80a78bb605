"""MLflow model registry: register exported ONNX students, gate promotion with aliases, roll back.

Promotion uses aliases only (stages are deprecated in MLflow 3): `champion` is what serving loads
(`models:/NAME@champion`), `challenger` a registered version that did not beat it. Every decision
is recorded as version tags (`promotion.*`), and the registered model keeps a `champion_history`
tag (JSON list of versions, oldest first) that `rollback` walks back.
"""

from __future__ import annotations

import json
import math
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow
import mlflow.onnx
import numpy as np
import onnx
import onnxruntime as ort
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import Schema, TensorSpec

from vidistill.config import validate_model_name
from vidistill.export.runtime import MODEL_FILE, read_metadata
from vidistill.registry.tracking import client, stage_run

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "champion_history"
# Version tags written by register_onnx (metric names are added as tags too, e.g. "top1").
RESERVED_TAGS = (
    "method", "data_hash", "parity_passed", "parity_max_abs_diff", "parity_top1_agreement",
    "onnx_opset", "classes", "frames", "size",
)


def _signature(proto: onnx.ModelProto) -> ModelSignature:
    """Tensor signature from the graph's input/output value infos; symbolic dims become -1."""

    def specs(values: Any) -> list[TensorSpec]:
        out = []
        for v in values:
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim)
            dtype = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
            out.append(TensorSpec(np.dtype(dtype), dims, v.name))
        return out

    return ModelSignature(inputs=Schema(specs(proto.graph.input)), outputs=Schema(specs(proto.graph.output)))


def register_onnx(
    onnx_path: str | Path,
    *,
    model_name: str,
    metrics: dict[str, float],
    parity: dict[str, Any],
    data_hash: str,
    method: str,
    run_id: str | None = None,
    classes: list[str] | None = None,
    extra_tags: dict[str, str] | None = None,
) -> str:
    """Log an exported `model.onnx` to MLflow and register it as a new version of `model_name`.

    The model is logged with `mlflow.onnx.log_model(name="model", ...)` into `run_id` (resumed),
    else into the active run, else into a new `register` stage run. The version is tagged with
    `method`, each metric (e.g. `top1`), `parity_passed`, `parity_max_abs_diff`,
    `parity_top1_agreement`, `onnx_opset`, `data_hash`, `classes` (JSON), `frames` and `size`.

    Args:
        onnx_path: the exported model file.
        model_name: registered model name (per dataset, e.g. "vidistill-synthetic").
        metrics: evaluation metrics of this student on the evaluation set `data_hash`.
        parity: the `check_parity` result (`passed`, `max_abs_diff`, `top1_agreement`).
        data_hash: content hash of the evaluation set the metrics were computed on.
        method: distillation method key.
        run_id: MLflow run to attach the model to.
        classes: class names in label order (default: the names stored in the ONNX metadata).
        extra_tags: more version tags (e.g. `precision`, `latency_ms`; `vidistill.registry.selection`).

    Returns:
        The new version number, as a string.

    Raises:
        vidistill.errors.ConfigError: `model_name` would not work in every `models:/` URI form.
    """
    validate_model_name(model_name)  # before anything is uploaded: a name every models:/ URI form can serve
    path = Path(onnx_path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} does not exist; run the export stage first")
    if not {"passed", "max_abs_diff"} <= set(parity):
        raise ValueError(f"parity must be a check_parity() result with 'passed' and 'max_abs_diff', got keys {sorted(parity)}")
    clash = sorted(set(metrics) & set(RESERVED_TAGS))
    if clash:
        raise ValueError(f"metric names {clash} clash with registry tags {RESERVED_TAGS}; rename them")
    bad = {k: v for k, v in metrics.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)}
    if bad:
        raise ValueError(f"metrics must be finite numbers, got {bad}")
    meta = read_metadata(path)
    classes = list(classes) if classes is not None else meta.get("classes")
    proto = onnx.load(str(path))
    tags = {
        "method": method,
        "data_hash": data_hash,
        "parity_passed": str(bool(parity["passed"])).lower(),
        "parity_max_abs_diff": repr(float(parity["max_abs_diff"])),
        "parity_top1_agreement": repr(float(parity.get("top1_agreement", float("nan")))),
        "onnx_opset": str(max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)),
        "classes": json.dumps(classes),
        "frames": str(meta.get("frames", "")),
        "size": str(meta.get("size", "")),
        **{k: repr(float(v)) for k, v in metrics.items()},
        **(extra_tags or {}),
    }

    c = client()

    def log() -> str:
        info = mlflow.onnx.log_model(
            proto,
            name="model",
            signature=_signature(proto),
            registered_model_name=model_name,
            save_as_external_data=False,
            # explicit requirements: MLflow's inference runs a subprocess that re-imports the model (~8 s)
            pip_requirements=[f"onnx=={onnx.__version__}", f"onnxruntime=={ort.__version__}"],
            metadata={"vidistill": {k: v for k, v in tags.items() if k != "classes"}, "classes": classes},
        )
        mlflow.log_metrics({f"registered.{k}": float(v) for k, v in metrics.items()})
        return str(info.registered_model_version)

    active = mlflow.active_run()
    if run_id is not None and (active is None or active.info.run_id != run_id):
        with mlflow.start_run(run_id=run_id, nested=active is not None):
            version = log()
    elif run_id is not None or active is not None:
        version = log()
    else:
        with stage_run("register", params={"model_name": model_name, "onnx_path": str(path)}, tags={"data_hash": data_hash, "method": method}):
            version = log()
    for key, value in tags.items():
        c.set_model_version_tag(model_name, version, key, value)
    return version


def _champion(c: Any, model_name: str) -> Any | None:
    try:
        return c.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None


def _history(c: Any, model_name: str) -> list[str]:
    return json.loads(c.get_registered_model(model_name).tags.get(HISTORY_TAG, "[]"))


def _registered(c: Any, model_name: str) -> Any:
    """The registered model, or a one-line ValueError naming what exists."""
    try:
        return c.get_registered_model(model_name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        names = sorted(m.name for m in c.search_registered_models(max_results=50))
        known = f"registered models: {', '.join(names)}" if names else "no model is registered there"
        raise ValueError(f"registered model {model_name!r} does not exist on {mlflow.get_tracking_uri()}; {known}") from None


def _versions(c: Any, model_name: str) -> list[str]:
    """The existing versions of `model_name`, oldest first."""
    return sorted((str(v.version) for v in c.search_model_versions(f"name = '{model_name}'")), key=int)


def _version(c: Any, model_name: str, version: str | int) -> Any:
    """A model version, or a one-line ValueError (deleted or never registered) listing the existing ones."""
    version = str(version)
    _registered(c, model_name)
    if not version.isdigit():
        raise ValueError(f"version must be a number, got {version!r}; {model_name!r} has versions {_versions(c, model_name)}")
    try:
        return c.get_model_version(model_name, version)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        existing = _versions(c, model_name)
        have = f"its versions are {', '.join(existing)}" if existing else "it has no versions left"
        raise ValueError(f"{model_name!r} has no version {version} (deleted or never registered); {have}") from None


def _exists(c: Any, model_name: str, version: str) -> bool:
    try:
        c.get_model_version(model_name, version)
        return True
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return False


def resolve(model_uri: str) -> Any:
    """The registered model version a `models:/` URI names, in every form MLflow accepts.

    Forms: `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `models:/NAME/latest` (the highest existing
    version), `models:/NAME/STAGE` (deprecated stages: the latest version in that stage), and MLflow 3's
    logged-model URI `models:/m-MODEL_ID` (the registered version made from that logged model).

    Raises:
        ValueError: a malformed URI, or a model, version, alias or stage that does not exist (one line
            naming it and what does exist).
    """
    from mlflow.store.artifact.utils.models import _parse_model_uri

    try:
        parsed = _parse_model_uri(model_uri)
    except MlflowException:
        parsed = None
    if parsed is None or (parsed.model_id is not None and not parsed.model_id.startswith("m-")):
        raise ValueError(f"expected a registry URI models:/NAME@ALIAS, models:/NAME/VERSION, models:/NAME/latest or "
                         f"models:/m-MODEL_ID, got {model_uri!r}")
    c = client()
    if parsed.model_id is not None:
        return _version_of_logged_model(c, parsed.model_id)
    name = parsed.name
    reg = _registered(c, name)
    if parsed.version is not None:
        return _version(c, name, parsed.version)
    if parsed.alias is not None:
        try:
            return c.get_model_version_by_alias(name, parsed.alias)
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            aliases = {a: str(v) for a, v in (reg.aliases or {}).items()}
            have = f"its aliases are {aliases}" if aliases else "it has no aliases; promote a version with `vidistill promote`"
            raise ValueError(f"{name!r} has no alias {parsed.alias!r} (its version may have been deleted); {have}") from None
    if parsed.stage is not None:
        with warnings.catch_warnings():  # stages are deprecated; the URI form is still MLflow's
            warnings.simplefilter("ignore", FutureWarning)
            latest = c.get_latest_versions(name, [parsed.stage])
        if not latest:
            raise ValueError(f"{name!r} has no version in stage {parsed.stage!r}; use models:/{name}@champion or models:/{name}/latest")
        return max(latest, key=lambda v: int(v.version))
    existing = _versions(c, name)
    if not existing:
        raise ValueError(f"{name!r} has no versions left; register one with `vidistill register`")
    return c.get_model_version(name, existing[-1])


def _version_of_logged_model(c: Any, model_id: str) -> Any:
    """The registered version whose source is MLflow 3's logged model `model_id` (`models:/m-...`)."""
    try:
        logged = c.get_logged_model(model_id)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            raise
        raise ValueError(f"no logged model {model_id!r} in the tracking server; copy the id from the model's page") from None
    run = logged.source_run_id
    # a version made from the logged model names it as its source (`model_id` itself is not always filled in)
    versions = [mv for mv in c.search_model_versions(f"run_id = '{run}'")
                if model_id in (getattr(mv, "model_id", None), (mv.source or "").removeprefix("models:/"))] if run else []
    if not versions:
        raise ValueError(f"logged model {model_id!r} ({logged.name!r}) is not a registered version; serve a registered one "
                         "(models:/NAME@champion) or register it with `vidistill register`")
    return max(versions, key=lambda v: int(v.version))


def _new_classes(champion: Any, candidate: Any) -> list[str]:
    """Classes of `candidate` that `champion` lacks, when the candidate keeps every champion class; else []."""
    try:
        old, new = json.loads(champion.tags.get("classes", "null")), json.loads(candidate.tags.get("classes", "null"))
    except ValueError:
        return []
    if not isinstance(old, list) or not isinstance(new, list) or not set(old) < set(new):
        return []
    return [c for c in new if c not in old]


def _metric(version: Any, metric: str) -> float:
    if metric not in version.tags:
        raise ValueError(
            f"version {version.version} of {version.name!r} has no {metric!r} tag; "
            f"its tags are {sorted(version.tags)}; register it with metrics={{{metric!r}: ...}}"
        )
    return float(version.tags[metric])


def promote(model_name: str, version: str | int, *, margin: float, metric: str = "top1") -> dict[str, Any]:
    """Gate a registered version: champion if it passes parity and beats the champion by `margin`.

    Rules, in order: a version whose ONNX parity failed is refused (no alias); with no champion yet
    it becomes champion; a champion evaluated on another data set (`data_hash` differs) makes the
    comparison meaningless, so the candidate is refused; it becomes champion when
    `candidate - champion >= margin` (and strictly better), else challenger. The decision, both
    numbers and the reason are written as version tags `promotion.*`.

    Args:
        model_name: registered model name.
        version: candidate version.
        margin: required improvement of `metric` over the champion (>= 0, same units as the metric).
        metric: version tag compared (higher is better).

    Returns:
        `{"model_name", "version", "decision" ("champion" | "challenger" | "refused"), "metric",
        "candidate", "champion", "champion_version", "margin", "reason"}`.
    """
    if not margin >= 0:
        raise ValueError(f"promotion margin must be >= 0, got {margin}")
    c = client()
    version = str(version)
    cand = _version(c, model_name, version)
    cand_value = _metric(cand, metric)
    current = _champion(c, model_name)
    champ_value = _metric(current, metric) if current is not None else None
    champ_version = str(current.version) if current is not None else None

    if cand.tags.get("parity_passed") != "true":
        decision = "refused"
        reason = (
            f"ONNX parity failed (max_abs_diff={cand.tags.get('parity_max_abs_diff', 'unknown')}); "
            "a model whose ONNX output differs from PyTorch is never served"
        )
    elif cand.tags.get("precision") == "int8" and cand.tags.get("int8_gate_passed") != "true":
        decision = "refused"
        reason = (f"int8 accuracy gate failed (top-1 drop {cand.tags.get('int8_top1_drop_points', 'unknown')} points); "
                  "an int8 model is promoted only when it keeps the float model's accuracy")
    elif current is None:
        decision, reason = CHAMPION, f"no champion yet; {metric}={cand_value:.4f} and parity passed"
    elif champ_version == version:
        decision, reason = CHAMPION, f"version {version} is already the champion"
    elif current.tags.get("data_hash") != cand.tags.get("data_hash") and _new_classes(current, cand):
        # new data that adds classes: the champion cannot name them, so it cannot be the better model on the
        # new evaluation set (issue 25: a new class folder must reach serving), unless the candidate is worse
        # than guessing
        added = ", ".join(_new_classes(current, cand))
        chance = 1.0 / len(json.loads(cand.tags["classes"]))
        if cand_value >= chance:
            decision = CHAMPION
            reason = (f"the candidate knows classes the champion v{champ_version} cannot name ({added}); "
                      f"{metric}={cand_value:.4f} on the new data (chance {chance:.4f}), parity passed")
        else:
            decision = "refused"
            reason = (f"the candidate adds classes ({added}) but its {metric} {cand_value:.4f} is below chance "
                      f"({chance:.4f}); the champion v{champ_version} stays")
    elif current.tags.get("data_hash") != cand.tags.get("data_hash"):
        decision = "refused"
        reason = (
            f"evaluation sets differ: candidate data_hash={cand.tags.get('data_hash')!r}, champion v{champ_version} "
            f"data_hash={current.tags.get('data_hash')!r}; evaluate both on the same test set before comparing"
        )
    elif cand_value > champ_value and cand_value - champ_value >= margin:
        decision = CHAMPION
        reason = f"{metric} {cand_value:.4f} beats champion v{champ_version} ({champ_value:.4f}) by >= margin {margin:g}"
    else:
        decision = CHALLENGER
        reason = f"{metric} {cand_value:.4f} does not beat champion v{champ_version} ({champ_value:.4f}) by margin {margin:g}"

    if decision == CHAMPION and champ_version != version:
        c.set_registered_model_alias(model_name, CHAMPION, version)
        history = _history(c, model_name) + [version]
        c.set_registered_model_tag(model_name, HISTORY_TAG, json.dumps(history))
        if CHALLENGER in cand.aliases:
            c.delete_registered_model_alias(model_name, CHALLENGER)
    elif decision == CHALLENGER:
        c.set_registered_model_alias(model_name, CHALLENGER, version)

    record = {
        "promotion.decision": decision,
        f"promotion.candidate_{metric}": repr(cand_value),
        f"promotion.champion_{metric}": "none" if champ_value is None else repr(champ_value),
        "promotion.champion_version": champ_version or "none",
        "promotion.margin": repr(float(margin)),
        "promotion.reason": reason,
    }
    for key, value in record.items():
        c.set_model_version_tag(model_name, version, key, value)
    return {
        "model_name": model_name,
        "version": version,
        "decision": decision,
        "metric": metric,
        "candidate": cand_value,
        "champion": champ_value,
        "champion_version": champ_version,
        "margin": float(margin),
        "reason": reason,
    }


def rollback(model_name: str, to_version: str | int | None = None) -> dict[str, Any]:
    """Move the `champion` alias back.

    Versions deleted from the registry are skipped: without `to_version` the target is the newest
    entry of `champion_history` before the current champion that still exists (and passed parity);
    deleted entries are dropped from the history.

    Args:
        model_name: registered model name.
        to_version: version to make champion (must exist and have passed parity); default: the
            previous champion that still exists.

    Returns:
        `{"model_name", "from_version", "to_version", "history", "skipped"}` (`skipped`: history
        entries passed over because they were deleted).

    Raises:
        ValueError: no such model or version, a version that failed parity, or no earlier champion
            left (one line).
    """
    c = client()
    _registered(c, model_name)
    current = _champion(c, model_name)
    history = _history(c, model_name)
    from_version = str(current.version) if current is not None else None
    skipped: list[str] = []
    if to_version is None:
        # walk back from the newest entry: drop the current champion and deleted versions
        kept = list(history)
        target = None
        while kept:
            last = kept[-1]
            if last == from_version:
                kept.pop()
            elif not _exists(c, model_name, last):
                skipped.append(last)
                kept.pop()
            else:
                target = last
                break
        if target is None:
            raise ValueError(
                f"{model_name!r} has no previous champion to roll back to (champion_history={history}, "
                f"deleted: {skipped or 'none'}, current champion: {from_version or 'none'}); pass --version explicitly"
            )
        history = kept
    else:
        target = str(to_version)
        mv = _version(c, model_name, target)
        if mv.tags.get("parity_passed") != "true":
            raise ValueError(f"refusing to roll {model_name!r} back to version {target}: its ONNX parity check did not pass")
        history = history[: len(history) - history[::-1].index(target)] if target in history else history + [target]
        skipped = [v for v in history if not _exists(c, model_name, v)]
        history = [v for v in history if v not in skipped]
    c.set_registered_model_alias(model_name, CHAMPION, target)
    c.set_registered_model_tag(model_name, HISTORY_TAG, json.dumps(history))
    c.set_model_version_tag(model_name, target, "promotion.decision", "champion")
    c.set_model_version_tag(model_name, target, "promotion.reason", f"rollback from version {from_version}")
    return {"model_name": model_name, "from_version": from_version, "to_version": target, "history": history, "skipped": skipped}


def download_model(model_uri: str, dst: str | Path | None = None) -> dict[str, Any]:
    """Download a registered ONNX model named by any `models:/` form `resolve` accepts.

    Args:
        model_uri: registry URI (`models:/NAME@alias`, `models:/NAME/VERSION`, `models:/NAME/latest`).
        dst: directory to download into (default: a new temporary directory).

    Returns:
        `{"onnx_path": Path, "classes": list[str] | None, "name": str, "version": str}`.

    Raises:
        ValueError: the URI does not resolve (one line, see `resolve`).
        FileNotFoundError: the version has no `model.onnx`.
    """
    mv = resolve(model_uri)
    name = mv.name
    out = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="vidistill-model-"))
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}", dst_path=str(out)))
    found = sorted(local.rglob(MODEL_FILE)) if local.is_dir() else [local]
    if not found:
        raise FileNotFoundError(f"{model_uri} (version {mv.version}) has no {MODEL_FILE} in its artifacts at {local}")
    classes = json.loads(mv.tags["classes"]) if "classes" in mv.tags else read_metadata(found[0]).get("classes")
    return {"onnx_path": found[0], "classes": classes, "name": name, "version": str(mv.version)}
