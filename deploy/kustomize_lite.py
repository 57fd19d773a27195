"""A small `kustomize build` for this project's k8s/ tree, so tests can render and validate the manifests where
kustomize/kubectl are not installed (CI). It implements the subset the tree uses, the way kustomize 5 does:

- resources (files and kustomization directories), namespace,
- images (newName / newTag / digest),
- secretGenerator / configMapGenerator with envs, literals and behavior create|replace|merge (only with
  generatorOptions.disableNameSuffixHash: true: no content hashes),
- patches: strategic-merge patches from a file or inline (several documents per file), with or without a target
  (kind, name regex, group, version, namespace, labelSelector k=v), `$patch: delete` of whole objects and null to
  delete a key; list merge keys of the Kubernetes types used here; custom resources merge as JSON merge patches,
- replacements: source fieldPath -> target fieldPaths with [key=value] list selectors and [dotted.key] map keys.

Anything else raises NotImplementedError rather than rendering something kustomize would not.

    python deploy/kustomize_lite.py k8s/overlays/gpu-prod     # prints the multi-document YAML
"""

from __future__ import annotations

import base64
import copy
import re
import sys
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_KEYS = {
    "apiVersion", "kind", "resources", "namespace", "images", "patches", "replacements",
    "secretGenerator", "configMapGenerator", "generatorOptions",
}
CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass", "PriorityClass",
    "CustomResourceDefinition", "IngressClass", "RuntimeClass", "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration", "APIService", "CSIDriver", "VolumeAttachment",
}
# Strategic-merge list keys (patchMergeKey) of the built-in types this tree patches.
MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name", "volumes": "name",
    "env": "name", "imagePullSecrets": "name", "volumeMounts": "mountPath", "volumeDevices": "devicePath",
}
BUILTIN_GROUPS = {"", "apps", "batch", "policy", "networking.k8s.io", "autoscaling", "rbac.authorization.k8s.io",
                  "storage.k8s.io", "scheduling.k8s.io"}

Resource = dict[str, Any]


def _group(api_version: str) -> str:
    return api_version.split("/")[0] if "/" in api_version else ""


def _load_docs(text: str) -> list[Resource]:
    return [d for d in yaml.safe_load_all(text) if d]


def _kustomization_file(directory: Path) -> Path:
    for name in KUSTOMIZATION_FILES:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"no kustomization file in {directory}")


# ----------------------------------------------------------------------------------------------- strategic merge
def _merge_key(field: str, kind: str, path: tuple[str, ...]) -> str | None:
    if field == "ports":
        return "port" if kind == "Service" and path[-2:] == ("spec", "ports") else "containerPort"
    return MERGE_KEYS.get(field)


def _smp(base: Any, patch: Any, kind: str, builtin: bool, path: tuple[str, ...] = ()) -> Any:
    if not isinstance(patch, dict) or not isinstance(base, dict):
        return copy.deepcopy(patch)
    out = dict(base)
    for key, value in patch.items():
        if key.startswith("$"):
            raise NotImplementedError(f"strategic-merge directive {key} at {'.'.join(path)}")
        if value is None:
            out.pop(key, None)
        elif key in out and isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _smp(out[key], value, kind, builtin, (*path, key))
        elif key in out and isinstance(value, list) and isinstance(out[key], list) and builtin:
            mkey = _merge_key(key, kind, (*path, key))
            if mkey and all(isinstance(i, dict) and mkey in i for i in value + out[key]):
                merged = list(out[key])
                for item in value:
                    idx = next((n for n, cur in enumerate(merged) if cur[mkey] == item[mkey]), None)
                    if idx is None:
                        merged.append(copy.deepcopy(item))
                    else:
                        merged[idx] = _smp(merged[idx], item, kind, builtin, (*path, key))
                out[key] = merged
            else:
                out[key] = copy.deepcopy(value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _matches(res: Resource, target: dict[str, Any]) -> bool:
    unknown = set(target) - {"group", "version", "kind", "name", "namespace", "labelSelector"}
    if unknown:
        raise NotImplementedError(f"patch target fields {sorted(unknown)}")
    api = res.get("apiVersion", "")
    meta = res.get("metadata", {})
    checks = [
        ("group", _group(api)), ("version", api.split("/")[-1]), ("kind", res.get("kind", "")),
        ("name", meta.get("name", "")), ("namespace", meta.get("namespace", "")),
    ]
    for field, actual in checks:
        if field in target and not re.fullmatch(target[field], actual):
            return False
    if "labelSelector" in target:
        labels = meta.get("labels") or {}
        for term in target["labelSelector"].split(","):
            if "=" not in term or "!=" in term:
                raise NotImplementedError(f"label selector term {term!r}")
            k, v = (s.strip() for s in term.split("=", 1))
            if labels.get(k) != v:
                return False
    return True


def _apply_patch(resources: list[Resource], patch: Resource, target: dict[str, Any] | None) -> list[Resource]:
    if isinstance(patch, list):
        raise NotImplementedError("JSON 6902 patches")
    delete = patch.get("$patch") == "delete"
    if "$patch" in patch and not delete:
        raise NotImplementedError(f"$patch: {patch['$patch']}")
    body = {k: v for k, v in patch.items() if k not in ("$patch", "apiVersion", "kind")}
    if target is None:
        target = {"kind": re.escape(patch["kind"]), "name": re.escape(patch["metadata"]["name"])}
        if _group(patch["apiVersion"]):
            target["group"] = re.escape(_group(patch["apiVersion"]))
    else:
        body.get("metadata", {}).pop("name", None)  # a targeted patch applies whatever its own name
    hits = [r for r in resources if _matches(r, target)]
    if not hits:
        raise ValueError(f"patch matches no resource: {target}")
    out = []
    for res in resources:
        if any(res is h for h in hits):
            if delete:
                continue
            res = _smp(res, body, res["kind"], _group(res["apiVersion"]) in BUILTIN_GROUPS)
        out.append(res)
    return out


# -------------------------------------------------------------------------------------------------- field paths
def _tokens(field_path: str) -> list[str]:
    return re.findall(r"\[[^\]]*\]|[^.\[\]]+", field_path)


def _step(node: Any, token: str, create: bool) -> Any:
    if token.startswith("[") and "=" in token:
        k, v = token[1:-1].split("=", 1)
        for item in node:
            if isinstance(item, dict) and str(item.get(k)) == v:
                return item
        raise KeyError(token)
    key = token[1:-1] if token.startswith("[") else token
    if isinstance(node, list):
        return node[int(key)]
    if key not in node:
        if not create:
            raise KeyError(key)
        node[key] = {}
    return node[key]


def get_path(obj: Any, field_path: str) -> Any:
    node = obj
    for tok in _tokens(field_path):
        node = _step(node, tok, create=False)
    return node


def set_path(obj: Any, field_path: str, value: Any, create: bool = False) -> None:
    toks = _tokens(field_path)
    node = obj
    for tok in toks[:-1]:
        node = _step(node, tok, create)
    last = toks[-1]
    key = last[1:-1] if last.startswith("[") else last
    if key not in node and not create:
        raise KeyError(f"{field_path}: {key} missing (options.create is false)")
    old = node.get(key)
    # kustomize keeps the target node's YAML tag: an int field stays an int.
    if isinstance(old, int) and not isinstance(old, bool) and isinstance(value, str) and value.isdigit():
        value = int(value)
    node[key] = value


def _select(res: Resource, sel: dict[str, Any]) -> bool:
    unknown = set(sel) - {"group", "version", "kind", "name", "namespace"}
    if unknown:
        raise NotImplementedError(f"replacement select fields {sorted(unknown)}")
    api = res.get("apiVersion", "")
    meta = res.get("metadata", {})
    actual = {"group": _group(api), "version": api.split("/")[-1], "kind": res.get("kind"),
              "name": meta.get("name"), "namespace": meta.get("namespace")}
    return all(actual[k] == v for k, v in sel.items())


def _replacements(resources: list[Resource], replacements: list[dict[str, Any]]) -> None:
    for rep in replacements:
        if "path" in rep:
            raise NotImplementedError("replacements from files")
        src = dict(rep["source"])
        field_path = src.pop("fieldPath", "metadata.name")
        if "options" in src:
            raise NotImplementedError("source options")
        sources = [r for r in resources if _select(r, src)]
        if len(sources) != 1:
            raise ValueError(f"replacement source {src} matches {len(sources)} resources")
        value = copy.deepcopy(get_path(sources[0], field_path))
        for tgt in rep["targets"]:
            if set(tgt.get("options", {})) - {"create"} or "reject" in tgt:
                raise NotImplementedError(f"replacement target options {tgt}")
            hits = [r for r in resources if _select(r, tgt["select"])]
            if not hits:
                raise ValueError(f"replacement target {tgt['select']} matches nothing")
            for res in hits:
                for fp in tgt["fieldPaths"]:
                    set_path(res, fp, copy.deepcopy(value), create=tgt.get("options", {}).get("create", False))


# -------------------------------------------------------------------------------------------------- generators
def _read_env_file(path: Path) -> dict[str, str]:
    data: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise ValueError(f"{path}: line without '=': {raw!r}")
        k, v = line.split("=", 1)
        data[k.strip()] = v
    return data


def _generate(kind: str, spec: dict[str, Any], root: Path, options: dict[str, Any]) -> Resource:
    if not options.get("disableNameSuffixHash"):
        raise NotImplementedError("generated names with content hashes (set disableNameSuffixHash: true)")
    if set(spec) - {"name", "namespace", "behavior", "envs", "literals", "type", "options"}:
        raise NotImplementedError(f"generator fields {sorted(spec)}")
    data: dict[str, str] = {}
    for env in spec.get("envs", []):
        data.update(_read_env_file(root / env))
    for lit in spec.get("literals", []):
        k, v = lit.split("=", 1)
        data[k] = v
    res: Resource = {"apiVersion": "v1", "kind": kind, "metadata": {"name": spec["name"]}}
    if spec.get("namespace"):
        res["metadata"]["namespace"] = spec["namespace"]
    if kind == "Secret":
        res["type"] = spec.get("type", "Opaque")
        res["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    else:
        res["data"] = data
    return res


def _add_generated(resources: list[Resource], gen: Resource, behavior: str) -> list[Resource]:
    same = [r for r in resources if r["kind"] == gen["kind"] and r["metadata"]["name"] == gen["metadata"]["name"]]
    if behavior == "create":
        if same:
            raise ValueError(f"{gen['kind']} {gen['metadata']['name']} exists: use behavior merge or replace")
        return [*resources, gen]
    if len(same) != 1:
        raise ValueError(f"{behavior}: no single {gen['kind']} {gen['metadata']['name']} to {behavior}")
    old = same[0]
    new = copy.deepcopy(old)
    if behavior == "replace":
        new["data"] = gen["data"]
        new.pop("stringData", None)
    elif behavior == "merge":
        new["data"] = {**(old.get("data") or {}), **gen["data"]}
    else:
        raise NotImplementedError(f"behavior {behavior}")
    if "type" in gen:
        new["type"] = gen["type"]
    return [new if r is old else r for r in resources]


# -------------------------------------------------------------------------------------------------------- images
def _split_image(image: str) -> tuple[str, str | None, str | None]:
    digest = None
    if "@" in image:
        image, digest = image.split("@", 1)
    tag = None
    slash = image.rfind("/")
    if ":" in image[slash + 1:]:
        image, tag = image.rsplit(":", 1)
    return image, tag, digest


def _set_images(node: Any, images: list[dict[str, Any]]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers", "ephemeralContainers") and isinstance(value, list):
                for c in value:
                    if isinstance(c, dict) and isinstance(c.get("image"), str):
                        c["image"] = _new_image(c["image"], images)
            _set_images(value, images)
    elif isinstance(node, list):
        for item in node:
            _set_images(item, images)


def _new_image(image: str, images: list[dict[str, Any]]) -> str:
    name, tag, digest = _split_image(image)
    for rule in images:
        if rule["name"] != name:
            continue
        name = rule.get("newName", name)
        if "digest" in rule:
            return f"{name}@{rule['digest']}"
        tag = rule.get("newTag", tag)
        break
    out = name + (f":{tag}" if tag else "")
    return out + (f"@{digest}" if digest else "")


# --------------------------------------------------------------------------------------------------------- build
def build(directory: str | Path) -> list[Resource]:
    """Render the kustomization in `directory` like `kustomize build` (resources in input order)."""
    root = Path(directory).resolve()
    kust = yaml.safe_load(_kustomization_file(root).read_text()) or {}
    unknown = set(kust) - SUPPORTED_KEYS
    if unknown:
        raise NotImplementedError(f"{root}: kustomization fields {sorted(unknown)}")

    resources: list[Resource] = []
    for entry in kust.get("resources", []):
        path = (root / entry).resolve()
        if path.is_dir():
            resources.extend(build(path))
        else:
            resources.extend(_load_docs(path.read_text()))

    options = kust.get("generatorOptions", {})
    for kind, key in (("ConfigMap", "configMapGenerator"), ("Secret", "secretGenerator")):
        for spec in kust.get(key, []):
            gen = _generate(kind, spec, root, options)
            resources = _add_generated(resources, gen, spec.get("behavior", "create"))

    for entry in kust.get("patches", []):
        if "options" in entry:
            raise NotImplementedError("patch options")
        text = (root / entry["path"]).read_text() if "path" in entry else entry["patch"]
        for patch in _load_docs(text):
            resources = _apply_patch(resources, patch, entry.get("target"))

    if "namespace" in kust:
        ns = kust["namespace"]
        for res in resources:
            if res["kind"] == "Namespace":
                res["metadata"]["name"] = ns
            elif res["kind"] not in CLUSTER_SCOPED:
                res["metadata"]["namespace"] = ns

    if kust.get("images"):
        for res in resources:
            _set_images(res, kust["images"])

    _replacements(resources, kust.get("replacements", []))
    return resources


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    sys.stdout.write(yaml.safe_dump_all(build(argv[0]), sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
