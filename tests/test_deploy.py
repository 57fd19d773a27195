"""Deployment files, checked offline (no Docker engine, no cluster): docker-compose.yml (+ the CPU override)
against the Compose specification's JSON schema, the Kubernetes manifests (kustomize base + overlays, rendered by
deploy/kustomize_lite.py) against the Kubernetes OpenAPI schemas shipped by kubernetes-validate and KEDA's
ScaledObject CRD schema, every `latent-verbalizer ...` command line against the real CLI parser, and one
cross-check that images, ports, settings (LV_*) and volume paths agree across Dockerfile, compose, k8s and
shared/settings.py."""

from __future__ import annotations

import argparse
import base64
import copy
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import pytest
import yaml

from latent_verbalizer.shared.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "deploy" / "schemas"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
K8S = ROOT / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
K8S_VERSIONS = ["1.29", kubernetes_validate.utils.latest_version()]

CLI = "latent-verbalizer"
IMAGE_PREFIX = "latent-verbalizer-"  # latent-verbalizer-cuda / latent-verbalizer-slim: the Dockerfile's targets
WORKERS = {"encoder": "encode", "decoder": "decode", "categorizer": "categorize"}  # worker -> RQ queue
GPU_STAGES = {"encoder", "decoder"}
PROJECT_SERVICES = {"gateway", *WORKERS}
# Volume name (compose named volume = k8s PVC) -> mount path in the containers.
VOLUMES = {"models": "/models", "artifacts": "/data/artifacts", "shards": "/data/shards"}
GATEWAY_PORT = 8000


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


kustomize = _load_module("kustomize_lite", ROOT / "deploy" / "kustomize_lite.py")


# ================================================================================================ compose helpers
class _Reset:
    """Compose's `!reset` / `!override` tags (merge control in override files)."""

    def __init__(self, value: Any, override: bool) -> None:
        self.value, self.override = value, override


class _ComposeLoader(yaml.SafeLoader):
    pass


def _tag(override: bool):
    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> _Reset:
        if isinstance(node, yaml.MappingNode):
            return _Reset(loader.construct_mapping(node, deep=True), override)
        if isinstance(node, yaml.SequenceNode):
            return _Reset(loader.construct_sequence(node, deep=True), override)
        return _Reset(loader.construct_scalar(node), override)

    return construct


_ComposeLoader.add_constructor("!reset", _tag(False))
_ComposeLoader.add_constructor("!override", _tag(True))

_VAR = re.compile(r"\$(?:(?P<dollar>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(node: Any, env: dict[str, str], used: set[str] | None = None) -> Any:
    """Compose variable interpolation ($VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, $$)."""

    def sub(m: re.Match) -> str:
        if m.group("dollar"):
            return "$"
        if m.group("named"):
            name, op, arg = m.group("named"), None, None
        else:
            mm = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:-|-|:\?|\?)(.*))?", m.group("braced"), re.S)
            assert mm, f"bad interpolation {m.group(0)!r}"
            name, op, arg = mm.groups()
        if used is not None:
            used.add(name)
        value = env.get(name)
        if op in (":-", ":?") and not value:
            value = None
        if value is not None:
            return value
        if op in (":-", "-"):
            return arg
        raise AssertionError(f"{m.group(0)}: variable {name} is required and unset")

    if isinstance(node, str):
        return _VAR.sub(sub, node)
    if isinstance(node, dict):
        return {k: interpolate(v, env, used) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env, used) for v in node]
    if isinstance(node, _Reset):
        return _Reset(interpolate(node.value, env, used), node.override)
    return node


def _merge(base: Any, over: Any) -> Any:
    """Compose override-file merge for what our files use: mappings merge, `!reset` drops, `!override` replaces,
    anything else replaces."""
    if isinstance(over, _Reset):
        return over.value if over.override else _Reset(None, False)
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            merged = _merge(out.get(k), v)
            if isinstance(merged, _Reset):
                out.pop(k, None)
            else:
                out[k] = merged
        return out
    return copy.deepcopy(over)


def _strip_extensions(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if not k.startswith("x-")}


def load_compose(files: list[Path], env: dict[str, str], used: set[str] | None = None) -> dict[str, Any]:
    model: dict[str, Any] = {}
    for f in files:
        doc = yaml.load(f.read_text(), Loader=_ComposeLoader)  # noqa: S506 - SafeLoader subclass
        model = _merge(model, interpolate(_strip_extensions(doc), env, used))
    return model


def env_example() -> dict[str, str]:
    """Every NAME=value in .env.example, commented out or not."""
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = re.fullmatch(r"#?\s*([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if m:
            out[m.group(1)] = m.group(2)
    return out


# Configurations of the compose stack to check: (files, .env values, profiles).
LLM_ENV = {**env_example(), "COMPOSE_PROFILES": "llm", "LV_CATEGORIZER_BACKEND": "openai",
           "LV_LLM_URL": "http://vllm:8000/v1", "LV_API_KEYS": "k1", "HF_TOKEN": "hf_x"}
COMPOSE_CASES = {
    "gpu-defaults": ([COMPOSE], {}),
    "cpu-defaults": ([COMPOSE, COMPOSE_CPU], {}),
    "gpu-llm-env-example": ([COMPOSE], LLM_ENV),
    "cpu-env-example": ([COMPOSE, COMPOSE_CPU], {k: v for k, v in env_example().items() if k != "COMPOSE_FILE"}),
}


def container_env(service: dict[str, Any], host_env: dict[str, str]) -> dict[str, str]:
    """The environment compose gives a container: a variable without a value is taken from the host/.env
    and left unset when absent there."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict((e.split("=", 1) + [None])[:2] for e in env)
    out = {}
    for k, v in env.items():
        if v is None:
            if k in host_env:
                out[k] = host_env[k]
        else:
            out[k] = str(v).lower() if isinstance(v, bool) else str(v)
    return out


def project_services(model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in model["services"].items() if s.get("image", "").startswith(IMAGE_PREFIX)}


# ==================================================================================================== CLI helpers
def cli_parse(argv: list[str]) -> argparse.Namespace:
    """Parse argv (without the program name) exactly as `latent-verbalizer` does: the command must be in
    services.cli.COMMANDS and its module's add_arguments must accept the rest."""
    from latent_verbalizer.services import cli

    assert argv, "empty command line"
    name = argv[0]
    assert name in cli.COMMANDS, f"`{CLI} {' '.join(argv)}`: no command {name!r} (have {sorted(cli.COMMANDS)})"
    parser = argparse.ArgumentParser(prog=CLI)
    sub = parser.add_subparsers(dest="command", required=True)
    importlib.import_module(cli.COMMANDS[name][0]).add_arguments(sub.add_parser(name))
    try:
        return parser.parse_args(argv)
    except SystemExit as e:  # argparse reports the error on stderr
        raise AssertionError(f"`{CLI} {' '.join(argv)}` does not parse (exit {e.code})") from None


# ===================================================================================================== Dockerfile
def dockerfile() -> dict[str, Any]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    out: dict[str, Any] = {"stages": set(), "env": {}, "volumes": [], "expose": [], "copy": [], "run": [],
                           "mkdir": ""}
    for ln in lines:
        instr, _, rest = ln.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            m = re.search(r"\bAS\s+(\S+)", rest, re.I)
            if m:
                out["stages"].add(m.group(1))
        elif instr == "ENV":
            out["env"].update(dict(re.findall(r"(\w+)=(\S+)", rest)))
        elif instr == "VOLUME":
            out["volumes"] += json.loads(rest)
        elif instr == "EXPOSE":
            out["expose"] += [int(p.split("/")[0]) for p in rest.split()]
        elif instr in ("ENTRYPOINT", "CMD"):
            out[instr.lower()] = json.loads(rest)
        elif instr == "HEALTHCHECK":
            out["healthcheck"] = json.loads(rest.split(" CMD ", 1)[1])
        elif instr == "COPY" and "--from" not in rest:
            out["copy"] += rest.split()[:-1]
        elif instr == "RUN":
            out["run"].append(rest)
            out["mkdir"] += " ".join(re.findall(r"mkdir -p ([^&;]+)", rest))
    return out


# ====================================================================================================== k8s helpers
def render(overlay: str | None, tmp_path: Path) -> list[dict[str, Any]]:
    """kustomize build of k8s/base or k8s/overlays/<overlay>, on a copy whose secrets.env files come from their
    committed .example (the real ones are git-ignored)."""
    tree = tmp_path / "k8s"
    if not tree.exists():
        shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("secrets.env"))
        for example in tree.rglob("secrets.env.example"):
            shutil.copy(example, example.with_name("secrets.env"))
    return kustomize.build(tree / ("base" if overlay is None else f"overlays/{overlay}"))


def objects(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def project_containers(docs: list[dict[str, Any]]):
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            for c in pod_spec(d)["containers"]:
                if IMAGE_PREFIX in c["image"]:
                    yield d, c


def k8s_container_env(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The environment Kubernetes gives a container (envFrom ConfigMaps/Secrets, then env)."""
    cms, secrets = objects(docs, "ConfigMap"), objects(docs, "Secret")
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            env.update(cms[src["configMapRef"]["name"]]["data"])
        else:
            data = secrets[src["secretRef"]["name"]].get("data") or {}
            env.update({k: base64.b64decode(v).decode() for k, v in data.items()})
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
            continue
        ref = e["valueFrom"]
        if "configMapKeyRef" in ref:
            r = ref["configMapKeyRef"]
            data = cms[r["name"]]["data"] if r["name"] in cms else {}
        else:
            r = ref["secretKeyRef"]
            raw = (secrets[r["name"]].get("data") or {}) if r["name"] in secrets else {}
            data = {k: base64.b64decode(v).decode() for k, v in raw.items()}
        if r["key"] in data:
            env[e["name"]] = data[r["key"]]
        else:
            assert r.get("optional"), f"{e['name']}: {r['name']}/{r['key']} missing and not optional"
    return env


_KEDA_SCHEMA = json.loads((SCHEMAS / "keda-scaledobject-v1alpha1.json").read_text())
_k8s_schema_cache: dict[tuple[str, str, str], jsonschema.protocols.Validator] = {}


def validate_k8s(obj: dict[str, Any], version: str) -> None:
    """Strict validation (unknown fields are errors) against the Kubernetes OpenAPI schema of that version, or
    KEDA's CRD schema for ScaledObjects."""
    if obj["apiVersion"] == "keda.sh/v1alpha1":
        assert obj["kind"] == "ScaledObject", obj["kind"]
        jsonschema.Draft202012Validator(_KEDA_SCHEMA).validate(obj)
        # The CRD's x-kubernetes-validations rule (CEL), which JSON Schema cannot express.
        spec = obj["spec"]
        assert spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100), obj["metadata"]["name"]
        return
    kubernetes_validate.validate(obj, version, strict=True)


# =================================================================================================== compose tests
@pytest.mark.parametrize("case", sorted(COMPOSE_CASES))
def test_compose_validates_against_compose_spec(case: str) -> None:
    files, env = COMPOSE_CASES[case]
    model = load_compose(files, env)
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(model)

    profiles = set(filter(None, env.get("COMPOSE_PROFILES", "").split(",")))
    active = {n for n, s in model["services"].items() if not s.get("profiles") or profiles & set(s["profiles"])}
    assert {"redis", *PROJECT_SERVICES} <= active
    assert ("vllm" in active) == ("llm" in profiles)
    for name, svc in model["services"].items():
        assert "healthcheck" in svc, f"{name}: no healthcheck"
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in model["services"], f"{name} depends on unknown {dep}"
            if dep not in active:
                assert name not in active or cond.get("required") is False, f"{name} needs inactive {dep}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in model["services"][dep], f"{name} waits for {dep}, which has no healthcheck"
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            assert source.startswith((".", "/")) or source in model["volumes"], f"{name}: undeclared volume {source}"


def test_compose_gpu_and_cpu_variants() -> None:
    gpu, cpu = (load_compose(f, {}) for f in ([COMPOSE], [COMPOSE, COMPOSE_CPU]))

    def gpu_devices(svc: dict[str, Any]) -> list[dict[str, Any]]:
        return svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])

    for name in GPU_STAGES:
        assert [d["driver"] for d in gpu_devices(gpu["services"][name])] == ["nvidia"]
        assert gpu["services"][name]["build"]["target"] == "cuda"
        assert gpu_devices(cpu["services"][name]) == []
        assert cpu["services"][name]["build"]["target"] == "slim"
        assert container_env(cpu["services"][name], {})["LV_DEVICE"] == "cpu"
    # vLLM has its own GPU, distinct from the workers'.
    vllm_ids = {i for d in gpu_devices(gpu["services"]["vllm"]) for i in d["device_ids"]}
    worker_ids = {i for n in GPU_STAGES for d in gpu_devices(gpu["services"][n]) for i in d["device_ids"]}
    assert vllm_ids and not vllm_ids & worker_ids
    for model in (gpu, cpu):
        for name in ("gateway", "categorizer"):
            assert not gpu_devices(model["services"][name]) and model["services"][name]["build"]["target"] == "slim"
    # vLLM: `vllm serve <model> --enable-prefix-caching`, serving the model the categorizer asks for.
    v = gpu["services"]["vllm"]
    assert v["entrypoint"] == ["vllm", "serve"] and "--enable-prefix-caching" in v["command"]
    llm_model = container_env(gpu["services"]["categorizer"], {})["LV_LLM_MODEL"]
    assert v["command"][0] == llm_model
    # redis keeps an append-only file on a volume.
    r = gpu["services"]["redis"]
    assert r["command"][r["command"].index("--appendonly") + 1] == "yes"
    assert any(vol.split(":")[1] == "/data" and vol.split(":")[0] in gpu["volumes"] for vol in r["volumes"])


def test_env_example_documents_every_setting_and_compose_variable() -> None:
    documented = set(env_example())
    settings = {f"LV_{f.upper()}" for f in Settings.model_fields}
    assert not settings - documented, f".env.example lacks settings: {sorted(settings - documented)}"
    used: set[str] = set()
    for files, env in COMPOSE_CASES.values():
        model = load_compose(files, env, used)
        for svc in model["services"].values():
            used |= {k for k, v in (svc.get("environment") or {}).items() if v is None}
    compose_builtin = {"COMPOSE_FILE", "COMPOSE_PROFILES"}
    assert not used - documented, f".env.example lacks compose variables: {sorted(used - documented)}"
    unused = documented - used - settings - compose_builtin
    assert not unused, f".env.example documents variables nothing uses: {sorted(unused)}"


# ======================================================================================================= CLI tests
def _command_lines(tmp_path: Path) -> dict[str, list[str]]:
    """Every `latent-verbalizer` command line the deployment files run: where -> argv after the program name."""
    lines: dict[str, list[str]] = {}
    df = dockerfile()
    assert df["entrypoint"] == [CLI]
    lines["Dockerfile CMD"] = df["cmd"]
    assert df["healthcheck"][0] == CLI
    lines["Dockerfile HEALTHCHECK"] = df["healthcheck"][1:]
    for case, (files, env) in COMPOSE_CASES.items():
        for name, svc in project_services(load_compose(files, env)).items():
            assert "entrypoint" not in svc, f"{name}: keep the image's entrypoint ({CLI})"
            lines[f"compose[{case}] {name} command"] = svc["command"]
            test = svc["healthcheck"]["test"]
            assert test[0] == "CMD" and test[1] == CLI, f"{name}: healthcheck {test}"
            lines[f"compose[{case}] {name} healthcheck"] = test[2:]
    for overlay in [None, *OVERLAYS]:
        for wl, c in project_containers(render(overlay, tmp_path)):
            where = f"k8s[{overlay or 'base'}] {wl['metadata']['name']}"
            argv = c.get("command", [CLI]) + c.get("args", [])
            assert argv[0] == CLI, f"{where}: runs {argv}"
            lines[f"{where} args"] = argv[1:]
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                if "exec" in c.get(probe, {}):
                    cmd = c[probe]["exec"]["command"]
                    assert cmd[0] == CLI, f"{where} {probe}: {cmd}"
                    lines[f"{where} {probe}"] = cmd[1:]
    return lines


def test_every_command_exists_in_the_cli(tmp_path: Path) -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(rf'^{CLI} = "latent_verbalizer\.services\.cli:main"$', pyproject, re.M), "console script missing"
    lines = _command_lines(tmp_path)
    assert {tuple(a[:2]) for a in lines.values() if a[0] == "worker"} == {("worker", w) for w in WORKERS}
    assert ["gateway", "--host", "0.0.0.0", "--port", str(GATEWAY_PORT)] in lines.values()
    problems = []
    for argv in sorted({tuple(a) for a in lines.values()}):
        try:
            cli_parse(list(argv))
        except (AssertionError, ImportError) as e:
            where = [w for w, a in lines.items() if tuple(a) == argv]
            problems.append(f"{' '.join(argv)!r} ({where[0]}{' ...' if len(where) > 1 else ''}): {e}")
    assert not problems, "commands missing from the CLI:\n" + "\n".join(problems)


def test_worker_queues_match_the_service_code() -> None:
    queue = importlib.import_module("latent_verbalizer.shared.queue")
    assert queue.ROLES == WORKERS, "worker -> RQ queue names differ from shared.queue.ROLES"


# ======================================================================================================= k8s tests
@pytest.mark.parametrize("overlay", [None, *OVERLAYS])
def test_k8s_manifests_validate(overlay: str | None, tmp_path: Path) -> None:
    docs = render(overlay, tmp_path)
    assert docs
    for version in K8S_VERSIONS:
        for obj in docs:
            try:
                validate_k8s(obj, version)
            except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as e:
                path = ".".join(map(str, e.path))
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} (k8s {version}): {path}: {e.message}")
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), "duplicate objects"
    namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
    assert namespaces == {objects(docs, "Namespace").popitem()[0]}


@pytest.mark.parametrize("overlay", [None, *OVERLAYS])
def test_k8s_wiring(overlay: str | None, tmp_path: Path) -> None:
    """References resolve, pods are schedulable as intended, and every worker scales on its own queue."""
    docs = render(overlay, tmp_path)
    deployments, services = objects(docs, "Deployment"), objects(docs, "Service")
    pvcs, pdbs, scaled = objects(docs, "PersistentVolumeClaim"), objects(docs, "PodDisruptionBudget"), objects(
        docs, "ScaledObject")
    workloads = {**deployments, **objects(docs, "StatefulSet")}
    assert set(deployments) >= PROJECT_SERVICES
    cfg = objects(docs, "ConfigMap")["latent-verbalizer-config"]["data"]

    for name, wl in workloads.items():
        spec = pod_spec(wl)
        labels = wl["spec"]["template"]["metadata"]["labels"]
        assert wl["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        for vol in spec.get("volumes", []):
            if "persistentVolumeClaim" in vol:
                assert vol["persistentVolumeClaim"]["claimName"] in pvcs, f"{name}: no PVC {vol}"
        for c in spec["containers"]:
            res = c["resources"]
            assert res["requests"].get("cpu") and res["requests"].get("memory") and res["limits"].get("memory"), name
            assert "livenessProbe" in c and "readinessProbe" in c, f"{name}: probes"
            gpus = int(res["limits"].get("nvidia.com/gpu", 0))
            tolerates = any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", []))
            assert bool(gpus) == tolerates == ("nvidia.com/gpu.present" in spec.get("nodeSelector", {})), name
            env = k8s_container_env(docs, c)
            if IMAGE_PREFIX in c["image"]:
                assert env["LV_DEVICE"] == ("cuda" if gpus else "cpu"), f"{name}: LV_DEVICE vs GPU"
                assert c["image"].split("/")[-1].startswith(IMAGE_PREFIX + ("cuda" if gpus else "")), name
            if name == "vllm":
                args = " ".join(c["args"])
                assert "--enable-prefix-caching" in args and c["command"] == ["vllm", "serve"]
                # One parameter: the tensor parallel size is also the GPU count.
                assert "--tensor-parallel-size=$(TENSOR_PARALLEL_SIZE)" in args
                assert int(env["TENSOR_PARALLEL_SIZE"]) == gpus
                assert c["args"][0] == "$(LV_LLM_MODEL)" and env["LV_LLM_MODEL"] == cfg["LV_LLM_MODEL"]
                assert re.search(r"\$\((\w+)\)", args) and all(v in env for v in re.findall(r"\$\((\w+)\)", args))
        for c in spec["containers"]:
            for src in c.get("envFrom", []):
                for ref, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                    if ref in src:
                        assert src[ref]["name"] in objects(docs, kind), f"{name}: no {kind} {src[ref]['name']}"
    for name, svc in services.items():
        hits = [w for w in workloads.values()
                if svc["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(hits) == 1, f"Service {name} selects {len(hits)} workloads"
        ports = {p.get("name"): p["containerPort"] for c in pod_spec(hits[0])["containers"] for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports or p["targetPort"] in ports.values(), f"Service {name}: {p}"
    for name in deployments:
        matching = [p for p in pdbs.values() if p["spec"]["selector"]["matchLabels"].items()
                    <= deployments[name]["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matching) == 1, f"Deployment {name}: {len(matching)} PodDisruptionBudgets"
    for pdb in pdbs.values():
        assert any(pdb["spec"]["selector"]["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"]
                   .items() for w in workloads.values()), pdb["metadata"]["name"]

    # vLLM, when deployed, is what the categorizer talks to.
    if "vllm" in deployments:
        url = urlparse(cfg["LV_LLM_URL"])
        assert url.hostname in services and url.port in [p["port"] for p in services[url.hostname]["spec"]["ports"]]
        assert cfg["LV_CATEGORIZER_BACKEND"] == "openai"
    else:
        assert cfg.get("LV_CATEGORIZER_BACKEND", "embedded") == "embedded" and "LV_LLM_URL" not in cfg

    # KEDA: one ScaledObject per worker on rq:queue:<prefix><stage>, GPU stages down to zero, Redis address = our
    # Service.
    if scaled:
        assert set(scaled) == set(WORKERS)
        redis = urlparse(cfg["LV_REDIS_URL"])
        namespace = next(iter(objects(docs, "Namespace")))
        for worker, queue in WORKERS.items():
            so = scaled[worker]
            assert so["spec"]["scaleTargetRef"]["name"] == worker and worker in deployments
            assert "replicas" not in deployments[worker]["spec"], f"{worker}: replicas fight the autoscaler"
            (trigger,) = so["spec"]["triggers"]
            md = trigger["metadata"]
            assert trigger["type"] == "redis" and md["listName"] == f"rq:queue:{cfg['LV_REDIS_PREFIX']}{queue}"
            assert md["address"] == f"{redis.hostname}.{namespace}.svc.cluster.local:{redis.port or 6379}"
            assert md.get("databaseIndex", "0") == (redis.path.strip("/") or "0")
            assert (so["spec"]["minReplicaCount"] == 0) == (worker in GPU_STAGES)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
@pytest.mark.parametrize("overlay", [None, *OVERLAYS])
def test_renderer_matches_kubectl_kustomize(overlay: str | None, tmp_path: Path) -> None:
    def canon(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: canon(v) for k, v in x.items()}
        if isinstance(x, list):
            items = [canon(i) for i in x]
            if items and all(isinstance(i, dict) and "name" in i for i in items):
                items.sort(key=lambda i: str(i["name"]))  # strategic merge may reorder name-keyed lists
            return items
        return x

    def by_id(docs: list[dict[str, Any]]) -> dict[tuple, Any]:
        return {(d["apiVersion"], d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): canon(d)
                for d in docs}

    mine = render(overlay, tmp_path)
    target = tmp_path / "k8s" / ("base" if overlay is None else f"overlays/{overlay}")
    out = subprocess.run(["kubectl", "kustomize", str(target)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert by_id(mine) == by_id(list(yaml.safe_load_all(out.stdout)))


# ============================================================================================== the cross-check
def test_cross_check_images_ports_settings_volumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dockerfile, compose, k8s and shared/settings.py agree on image names, ports, LV_* names and volume
    paths; and the settings every container gets parse into Settings."""
    df = dockerfile()
    fields = {f"LV_{f.upper()}" for f in Settings.model_fields}
    gpu = load_compose([COMPOSE], {})
    cpu = load_compose([COMPOSE, COMPOSE_CPU], {})
    base = render(None, tmp_path)
    rendered = {o: render(o, tmp_path) for o in OVERLAYS}

    # --- every LV_* name anywhere in the deployment files is a Settings field
    texts = [DOCKERFILE, COMPOSE, COMPOSE_CPU, ENV_EXAMPLE, ROOT / "docs" / "deploy.md", *K8S.rglob("*.yaml"),
             *K8S.rglob("*.env.example")]
    unknown = {}
    for path in texts:
        for name in set(re.findall(r"\bLV_[A-Z0-9_]*[A-Z0-9]\b", path.read_text())) - fields:
            unknown.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert not unknown, f"LV_* names that are not fields of shared.settings.Settings: {unknown}"

    # --- images: Dockerfile targets <-> compose build targets/image names <-> k8s images
    assert {"cuda", "slim"} <= df["stages"]
    tags = set()
    for model in (gpu, cpu):
        for name, svc in project_services(model).items():
            repo, tag = svc["image"].rsplit(":", 1)
            tags.add(tag)
            assert svc["build"]["target"] in df["stages"] and repo == IMAGE_PREFIX + svc["build"]["target"], name
    assert len(tags) == 1
    compose_images = {n: s["image"] for n, s in gpu["services"].items()}
    k8s_images = {w["metadata"]["name"]: c["image"] for w in base if w["kind"] in ("Deployment", "StatefulSet")
                  for c in pod_spec(w)["containers"]}
    assert compose_images.keys() == k8s_images.keys()
    assert compose_images == k8s_images
    cpu_dev = {w["metadata"]["name"]: c["image"] for w, c in project_containers(rendered["cpu-dev"])}
    assert cpu_dev == {n: s["image"] for n, s in project_services(cpu).items()}

    # --- ports: gateway 8000 everywhere; vLLM and Redis where their clients look for them
    assert df["expose"] == [GATEWAY_PORT] and df["env"]["LV_PORT"] == str(GATEWAY_PORT)
    assert df["cmd"][df["cmd"].index("--port") + 1] == str(GATEWAY_PORT)
    gw = gpu["services"]["gateway"]
    assert gw["command"][gw["command"].index("--port") + 1] == str(GATEWAY_PORT)
    assert [p.rsplit(":", 1)[1] for p in gw["ports"]] == [str(GATEWAY_PORT)]
    assert container_env(gw, {})["LV_PORT"] == str(GATEWAY_PORT)
    for docs in (base, *rendered.values()):
        cfg = objects(docs, "ConfigMap")["latent-verbalizer-config"]["data"]
        assert cfg["LV_PORT"] == str(GATEWAY_PORT)
        dep = objects(docs, "Deployment")["gateway"]
        (c,) = pod_spec(dep)["containers"]
        assert c["args"][c["args"].index("--port") + 1] == str(GATEWAY_PORT)
        assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": GATEWAY_PORT}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz?scope=gateway", "port": "http"}
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(GATEWAY_PORT)
        svc_ports = objects(docs, "Service")["gateway"]["spec"]["ports"]
        assert [(p["port"], p["targetPort"]) for p in svc_ports] == [(GATEWAY_PORT, "http")]
        redis_url = urlparse(cfg["LV_REDIS_URL"])
        assert [p["port"] for p in objects(docs, "Service")[redis_url.hostname]["spec"]["ports"]] == [redis_url.port]
        if "vllm" in objects(docs, "Deployment"):
            llm = urlparse(cfg["LV_LLM_URL"])
            (vc,) = pod_spec(objects(docs, "Deployment")["vllm"])["containers"]
            assert f"--port={vc['ports'][0]['containerPort']}" in vc["args"]
            assert objects(docs, "Service")[llm.hostname]["spec"]["ports"][0]["port"] == llm.port
    compose_llm = urlparse(LLM_ENV["LV_LLM_URL"])
    vllm = gpu["services"]["vllm"]
    assert compose_llm.hostname == "vllm" and f"--port={compose_llm.port}" in vllm["command"]
    assert f"localhost:{compose_llm.port}/health" in " ".join(vllm["healthcheck"]["test"])
    assert urlparse(env_example()["LV_LLM_URL"]) == compose_llm
    k8s_redis = urlparse(objects(base, "ConfigMap")["latent-verbalizer-config"]["data"]["LV_REDIS_URL"])
    for model in (gpu, cpu):
        for name, svc in project_services(model).items():
            redis = urlparse(container_env(svc, {})["LV_REDIS_URL"])
            assert redis == k8s_redis and redis.hostname in model["services"] and redis.port == 6379, name
    # An external Redis (or host networking) is one line in .env, not an override of every service.
    external = "redis://redis.example.org:6380/2"
    for name, svc in project_services(load_compose([COMPOSE, COMPOSE_CPU], {"LV_REDIS_URL": external})).items():
        assert container_env(svc, {})["LV_REDIS_URL"] == external, name

    # --- volume paths: Dockerfile mount points = compose mount points = k8s mount paths = settings paths. The
    # Dockerfile declares no VOLUME: each one a service does not mount is an anonymous volume, left by `down -v`.
    assert df["volumes"] == [], "VOLUME in the Dockerfile: anonymous volumes where a service does not mount it"
    created = df["mkdir"].split()
    assert all(any(c == p or c.startswith(p + "/") for c in created) for p in VOLUMES.values()), created
    path_settings = {"LV_MODEL_CACHE": VOLUMES["models"], "LV_ARTIFACT_DIR": VOLUMES["artifacts"],
                     "LV_DATA_ROOTS": VOLUMES["shards"]}
    assert {k: df["env"][k] for k in path_settings} == path_settings
    assert df["env"]["HF_HOME"].startswith(VOLUMES["models"] + "/")
    for model in (gpu, cpu):
        for name, svc in project_services(model).items():
            env = container_env(svc, {})
            assert {k: env[k] for k in path_settings} == path_settings and env["HF_HOME"] == df["env"]["HF_HOME"]
            mounts = {}
            for vol in svc["volumes"]:
                src, dst = vol.split(":")[:2]
                mounts[dst] = src
            assert set(mounts) <= set(VOLUMES.values()), f"{name}: {mounts}"
            for vname, path in VOLUMES.items():
                if path in mounts and vname != "shards":
                    assert mounts[path] == vname, f"{name}: {path} <- {mounts[path]}"
            assert mounts.get(VOLUMES["artifacts"]) == "artifacts", f"{name}: artifact store not shared"
            if name in GPU_STAGES:
                assert mounts.get(VOLUMES["models"]) == "models", f"{name}: model cache not on a volume"
            if VOLUMES["shards"] in mounts:
                assert [v for v in svc["volumes"] if v.split(":")[1] == VOLUMES["shards"]][0].endswith(":ro")
    for docs in (base, *rendered.values()):
        cfg = objects(docs, "ConfigMap")["latent-verbalizer-config"]["data"]
        assert {k: cfg[k] for k in path_settings} == path_settings and cfg["HF_HOME"] == df["env"]["HF_HOME"]
        for wl, c in project_containers(docs):
            name = wl["metadata"]["name"]
            claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                      for v in pod_spec(wl).get("volumes", []) if "persistentVolumeClaim" in v}
            mounts = {m["mountPath"]: claims.get(m["name"]) for m in c.get("volumeMounts", [])}
            mounts.pop("/dev/shm", None)
            assert mounts == {p: v for v, p in VOLUMES.items() if p in mounts}, f"{name}: {mounts}"
            compose_mounts = {v.split(":")[1] for v in gpu["services"][name]["volumes"]}
            assert set(mounts) == compose_mounts, f"{name}: k8s mounts {set(mounts)} vs compose {compose_mounts}"

    # --- the settings each container gets are valid Settings (e.g. list-typed fields parse from these strings)
    envs: dict[str, dict[str, str]] = {"Dockerfile ENV": {k: v for k, v in df["env"].items() if k.startswith("LV_")}}
    for case, (files, host_env) in COMPOSE_CASES.items():
        for name, svc in project_services(load_compose(files, host_env)).items():
            envs[f"compose[{case}] {name}"] = container_env(svc, host_env)
    for overlay, docs in [("base", base), *rendered.items()]:
        for wl, c in project_containers(docs):
            envs[f"k8s[{overlay}] {wl['metadata']['name']}"] = k8s_container_env(docs, c)
    for where, env in envs.items():
        for key in [k for k in os.environ if k.startswith("LV_")]:
            monkeypatch.delenv(key)
        for k, v in env.items():
            if k.startswith("LV_"):
                monkeypatch.setenv(k, v)
        try:
            settings = Settings()
        except Exception as e:  # noqa: BLE001 - report which container's environment fails
            pytest.fail(f"{where}: its LV_* environment does not load into Settings: {e}")
        for k, v in env.items():
            value = getattr(settings, k[3:].lower(), None) if k.startswith("LV_") else None
            if isinstance(value, bool):
                assert str(value).lower() == v.lower(), f"{where}: {k}"
            elif isinstance(value, (str, int)):
                assert str(value) == v, f"{where}: {k}"


# ================================================================================== the checks can fail
def test_validators_reject_broken_files(tmp_path: Path) -> None:
    """Each validator used above rejects a plausible mistake, so a green run means something."""
    compose_schema = jsonschema.Draft202012Validator(json.loads((SCHEMAS / "compose-spec.json").read_text()))
    model = load_compose([COMPOSE], {})
    assert compose_schema.is_valid(model)
    bad = copy.deepcopy(model)
    bad["services"]["gateway"]["helthcheck"] = bad["services"]["gateway"].pop("healthcheck")
    assert not compose_schema.is_valid(bad)
    bad = copy.deepcopy(model)
    bad["services"]["encoder"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] = "gpu"
    assert not compose_schema.is_valid(bad)

    with pytest.raises(AssertionError, match="required and unset"):
        interpolate("${LV_API_KEYS:?set it}", {})
    assert interpolate("${A:-x}-${B-y}-$$C", {"A": "", "B": ""}) == "x--$C"

    docs = render(None, tmp_path)
    dep = copy.deepcopy(objects(docs, "Deployment")["encoder"])
    pod_spec(dep)["containers"][0]["livenesProbe"] = pod_spec(dep)["containers"][0].pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s(dep, K8S_VERSIONS[-1])
    so = copy.deepcopy(objects(docs, "ScaledObject")["encoder"])
    so["spec"]["triggers"][0]["metadata"]["listLength"] = 8  # trigger metadata values must be strings
    with pytest.raises(jsonschema.ValidationError):
        validate_k8s(so, K8S_VERSIONS[-1])
    so = copy.deepcopy(objects(docs, "ScaledObject")["encoder"])
    so["spec"]["minReplicaCount"] = 9
    with pytest.raises(AssertionError):
        validate_k8s(so, K8S_VERSIONS[-1])

    with pytest.raises(AssertionError, match="no command"):
        cli_parse(["no-such-command"])
    with pytest.raises(AssertionError, match="does not parse"):
        cli_parse(["verbalize", "--no-such-flag"])


def test_dockerfile_builds_behind_a_mirror_or_without_a_registry() -> None:
    """No `# syntax=` line (BuildKit would pull a frontend image); every pip step goes through pip-build, with
    the mirror build args, the optional pip.conf / CA bundle secrets and the constraints; compose passes the
    mirror on."""
    text = DOCKERFILE.read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I), "a syntax line needs a registry to build"
    args = set(re.findall(r"^ARG (\w+)", text, re.M))
    assert {"PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "TORCH_CPU_INDEX_URL",
            "TORCH_CPU_VERSION", "TORCHVISION_CPU_VERSION"} <= args
    pip_runs = [r for r in dockerfile()["run"] if re.search(r"\bpip(-build)?\b", r)]
    assert len(pip_runs) >= 5, pip_runs
    for run in pip_runs:
        assert not re.search(r"(?<![\w-])pip install", run), f"bare pip (no mirror, no secrets): {run}"
        assert "id=pip.conf" in run and "id=ca.pem" in run, f"pip step without the build secrets: {run}"
        for install in re.findall(r"pip-build install[^&|]*", run):
            assert " -c /" in install and "constraints.txt" in install, f"install without the pins: {install}"
    for svc in project_services(load_compose([COMPOSE], {"PIP_INDEX_URL": "https://m.example/simple"})).values():
        assert svc["build"]["args"]["PIP_INDEX_URL"] == "https://m.example/simple"


def _pip_build(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """deploy/pip-build.sh with this environment's pip and no pip configuration of this machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    return subprocess.run(["sh", str(ROOT / "deploy" / "pip-build.sh"), *argv], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_slim_torch_check_answers_at_once(tmp_path: Path) -> None:
    """The slim target's first step asks the CPU torch index for the exact version: yes, no, and an index
    that cannot be reached is a quick no (the Dockerfile then names the alternative, --target cuda)."""
    page = tmp_path / "simple" / "torch"
    page.mkdir(parents=True)
    wheel = "torch-2.14.1+cpu-py3-none-any.whl"
    (page / wheel).write_bytes(b"")
    (page / "index.html").write_text(f'<html><body><a href="{wheel}">{wheel}</a></body></html>')
    index = (tmp_path / "simple").as_uri()
    assert _pip_build("has-version", index, "torch", "2.14.1+cpu").returncode == 0
    assert _pip_build("has-version", index, "torch", "2.14.1").returncode != 0
    assert _pip_build("has-version", index, "torch", "2.15.0+cpu").returncode != 0
    t0 = time.monotonic()
    assert _pip_build("has-version", "http://127.0.0.1:9/simple", "torch", "2.14.1+cpu").returncode != 0
    assert time.monotonic() - t0 < 30


def test_dockerignore_keeps_build_inputs_only() -> None:
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    assert patterns[0] == "*", "allow-list .dockerignore expected"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    sources = [s.rstrip("*") for s in dockerfile()["copy"] if not s.startswith("--")]
    assert sources and {s for s in sources} <= allowed, f"COPY sources excluded by .dockerignore: {sources}"
    for name in ("shared", "services", "pyproject.toml"):
        assert name in allowed
    assert not allowed & {".git", ".venv", ".env", "tests", "runs"}
