"""Render a kustomization the way `kubectl kustomize` does, for the subset of kustomize these
manifests use, so they can be checked offline where no kustomize binary is installed.

Supported kustomization fields: `resources` (YAML files or directories holding a kustomization),
`namespace`, `images` (name -> newName/newTag/digest) and `patches` (each a `path` or inline
`patch`, optionally with a `target`): a patch whose content is a YAML list is an RFC 6902 JSON patch
(ops add/remove/replace/test) applied to the resources its `target` selects; otherwise it is a
strategic-merge patch of a built-in kind, matched by kind and name (lists merged on their
Kubernetes patch-merge keys, other lists replaced, `null` deletes a key). Any other field, or a
strategic-merge patch of a custom resource (whose merge semantics kustomize takes from the CRD
schema), raises `ValueError`: use a JSON patch with a target for those.

Usage: `python k8s/render.py k8s/overlays/gke > rendered.yaml`
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

Resource = dict[str, Any]

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
# kinds that have no namespace (kustomize leaves them alone, and renames a Namespace to `namespace`)
CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "StorageClass",
    "PersistentVolume", "PriorityClass", "ClusterServingRuntime", "ClusterStorageContainer",
    "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration", "RuntimeClass",
}
# API groups whose kinds have strategic-merge metadata built into kustomize
BUILTIN_GROUPS = {"", "apps", "batch", "networking.k8s.io", "policy", "rbac.authorization.k8s.io",
                  "autoscaling", "storage.k8s.io", "scheduling.k8s.io"}
# list fields merged item by item in a strategic-merge patch (x-kubernetes-patch-merge-key)
MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name", "env": "name",
    "volumes": "name", "imagePullSecrets": "name", "volumeMounts": "mountPath",
    "hostAliases": "ip",
}


def _group(api_version: str) -> str:
    return api_version.split("/")[0] if "/" in api_version else ""


def _load_yaml_docs(path: Path) -> list[Any]:
    with path.open() as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


def _kustomization_file(directory: Path) -> Path:
    for name in KUSTOMIZATION_FILES:
        if (directory / name).is_file():
            return directory / name
    raise ValueError(f"{directory} holds no kustomization file ({', '.join(KUSTOMIZATION_FILES)})")


def render(directory: str | Path) -> list[Resource]:
    """Build the resources of the kustomization in `directory`.

    Args:
        directory: a folder holding `kustomization.yaml`.

    Returns:
        The rendered resources, in the order their files list them.

    Raises:
        ValueError: a field, patch or resource this renderer does not support, or a patch that
            matches no resource.
    """
    directory = Path(directory)
    kfile = _kustomization_file(directory)
    (spec,) = _load_yaml_docs(kfile)
    unknown = sorted(set(spec) - SUPPORTED_FIELDS)
    if unknown:
        raise ValueError(f"{kfile}: unsupported kustomization field(s) {unknown}; "
                         f"this renderer supports {sorted(SUPPORTED_FIELDS)}")
    resources: list[Resource] = []
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            resources += render(path)
        elif path.is_file():
            resources += [doc for doc in _load_yaml_docs(path)]
        else:
            raise ValueError(f"{kfile}: resource {entry!r} is neither a file nor a directory")
    for patch in spec.get("patches", []):
        _apply_patch(resources, patch, directory, kfile)
    if "namespace" in spec:
        _set_namespace(resources, spec["namespace"])
    for image in spec.get("images", []):
        _set_image(resources, image)
    return resources


def _set_namespace(resources: list[Resource], namespace: str) -> None:
    for res in resources:
        if res["kind"] == "Namespace":
            res["metadata"]["name"] = namespace
        elif res["kind"] not in CLUSTER_SCOPED:
            res["metadata"]["namespace"] = namespace


def _set_image(resources: list[Resource], image: dict[str, str]) -> None:
    def visit(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    for container in value:
                        _retag(container, image)
                visit(value)
        elif isinstance(node, list):
            for item in node:
                visit(item)

    for res in resources:
        visit(res)


def _retag(container: dict[str, Any], image: dict[str, str]) -> None:
    ref = container.get("image")
    if not isinstance(ref, str):
        return
    name, _, digest = ref.partition("@")
    tag = ""
    if ":" in name.rsplit("/", 1)[-1]:  # a colon in the last path part is a tag, not a registry port
        name, tag = name.rsplit(":", 1)
    if name != image["name"]:
        return
    new = image.get("newName", name)
    if "digest" in image:
        container["image"] = f"{new}@{image['digest']}"
    elif "newTag" in image:
        container["image"] = f"{new}:{image['newTag']}"
    else:
        container["image"] = new + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def _matches(res: Resource, target: dict[str, str]) -> bool:
    api = res.get("apiVersion", "")
    checks = {
        "group": _group(api), "version": api.split("/")[-1], "kind": res.get("kind"),
        "name": res["metadata"].get("name"), "namespace": res["metadata"].get("namespace"),
    }
    unknown = set(target) - set(checks)
    if unknown:
        raise ValueError(f"unsupported patch target field(s) {sorted(unknown)}; supported: {sorted(checks)}")
    return all(checks[k] == v for k, v in target.items())


def _apply_patch(resources: list[Resource], patch: dict[str, Any], directory: Path, kfile: Path) -> None:
    if "path" in patch:
        docs = _load_yaml_docs(directory / patch["path"])
        where = f"{kfile}: patch {patch['path']}"
    elif "patch" in patch:
        docs = [doc for doc in yaml.safe_load_all(patch["patch"]) if doc is not None]
        where = f"{kfile}: inline patch"
    else:
        raise ValueError(f"{kfile}: a patch needs `path` or `patch`, got {sorted(patch)}")
    target = patch.get("target")
    if len(docs) == 1 and isinstance(docs[0], list):
        if not target:
            raise ValueError(f"{where}: a JSON patch needs a `target`")
        selected = [res for res in resources if _matches(res, target)]
        if not selected:
            raise ValueError(f"{where}: target {target} matches no resource")
        for res in selected:
            json_patch(res, docs[0])
        return
    for doc in docs:
        if _group(doc.get("apiVersion", "")) not in BUILTIN_GROUPS:
            raise ValueError(f"{where}: strategic-merge patch of custom resource {doc.get('kind')} "
                             "is not supported; use a JSON patch (a list of ops) with a target")
        selector = target or {"kind": doc["kind"], "name": doc["metadata"]["name"]}
        selected = [res for res in resources if _matches(res, selector)]
        if not selected:
            raise ValueError(f"{where}: {doc['kind']}/{doc['metadata'].get('name')} matches no resource")
        for res in selected:
            body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind")}
            body["metadata"] = {k: v for k, v in doc.get("metadata", {}).items() if k not in ("name", "namespace")}
            merged = strategic_merge(res, body)
            res.clear()
            res.update(merged)


def strategic_merge(base: Any, patch: Any) -> Any:
    """Strategic-merge `patch` into `base` (both plain YAML data); returns a new object.

    Maps merge key by key (`None` deletes the key); lists named in `MERGE_KEYS` merge their items
    on that key (container `ports` on `containerPort`, Service `ports` on `port`); any other list,
    and any scalar, is replaced by the patch's value.
    """
    if not (isinstance(base, dict) and isinstance(patch, dict)):
        return copy.deepcopy(patch)
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(key, str) and key.startswith("$"):
            raise ValueError(f"strategic-merge directive {key!r} is not supported")
        if value is None:
            out.pop(key, None)
        elif isinstance(value, list) and isinstance(out.get(key), list):
            merge_key = MERGE_KEYS.get(key)
            if key == "ports":
                merge_key = "containerPort" if all("containerPort" in p for p in value) else "port"
            out[key] = _merge_list(out[key], value, merge_key) if merge_key else copy.deepcopy(value)
        else:
            out[key] = strategic_merge(out.get(key), value)
    return out


def _merge_list(base: list[Any], patch: list[Any], key: str) -> list[Any]:
    out = copy.deepcopy(base)
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            raise ValueError(f"strategic-merge list item {item!r} lacks its merge key {key!r}")
        for i, existing in enumerate(out):
            if isinstance(existing, dict) and existing.get(key) == item[key]:
                out[i] = strategic_merge(existing, item)
                break
        else:
            out.append(copy.deepcopy(item))
    return out


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ValueError(f"JSON pointer {path!r} must start with '/'")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _index(container: list[Any], token: str, *, allow_end: bool) -> int:
    if token == "-" and allow_end:
        return len(container)
    if not token.isdigit():
        raise ValueError(f"JSON pointer token {token!r} is not a list index")
    i = int(token)
    if i > len(container) or (i == len(container) and not allow_end):
        raise ValueError(f"list index {i} out of range (length {len(container)})")
    return i


def json_patch(doc: Any, ops: list[dict[str, Any]]) -> None:
    """Apply RFC 6902 operations `add`, `remove`, `replace` and `test` to `doc` in place."""
    for op in ops:
        kind, tokens = op.get("op"), _pointer(op.get("path", ""))
        if kind not in ("add", "remove", "replace", "test"):
            raise ValueError(f"JSON patch op {kind!r} is not supported (add, remove, replace, test)")
        if not tokens:
            raise ValueError("JSON patch on the document root is not supported")
        parent = doc
        for token in tokens[:-1]:
            if isinstance(parent, list):
                parent = parent[_index(parent, token, allow_end=False)]
            elif isinstance(parent, dict) and token in parent:
                parent = parent[token]
            else:
                raise ValueError(f"JSON patch path {op['path']!r}: {token!r} does not exist")
        last = tokens[-1]
        if isinstance(parent, list):
            i = _index(parent, last, allow_end=kind == "add")
            if kind == "add":
                parent.insert(i, copy.deepcopy(op["value"]))
            elif kind == "remove":
                del parent[i]
            elif kind == "replace":
                parent[i] = copy.deepcopy(op["value"])
            elif parent[i] != op["value"]:
                raise ValueError(f"JSON patch test failed at {op['path']!r}: {parent[i]!r} != {op['value']!r}")
        elif isinstance(parent, dict):
            if kind != "add" and last not in parent:
                raise ValueError(f"JSON patch {kind} at {op['path']!r}: {last!r} does not exist")
            if kind in ("add", "replace"):
                parent[last] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del parent[last]
            elif parent[last] != op["value"]:
                raise ValueError(f"JSON patch test failed at {op['path']!r}: {parent[last]!r} != {op['value']!r}")
        else:
            raise ValueError(f"JSON patch path {op['path']!r} does not lead into a map or list")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python k8s/render.py KUSTOMIZATION_DIR", file=sys.stderr)
        return 2
    yaml.safe_dump_all(render(args[0]), sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
