"""k8s/overlays/learner: the learner sees every pod's training log, every sidecar sees the promoted head."""

from __future__ import annotations

from pathlib import PurePosixPath

import kubernetes_validate
import pytest

from reranker.config import Settings

from test_deploy import K8S_VERSIONS, render

OVERLAY = "overlays/learner"


def _deployment(docs: list[dict], name: str) -> dict:
    (found,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == name]
    return found


def sidecar(docs: list[dict]) -> dict:
    pod = _deployment(docs, "candidate-generation")["spec"]["template"]["spec"]
    (found,) = [c for c in pod["initContainers"] if c["name"] == "reranker"]
    return found


def _settings(docs: list[dict]) -> Settings:
    (config,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("reranker-config")]
    return Settings.from_sources([], config["data"])


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_learner_overlay_validates_against_the_schemas(version: str) -> None:
    docs = render(OVERLAY)
    assert {d["kind"] for d in docs} == {"ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "PersistentVolumeClaim"}
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_every_sidecar_logs_to_its_own_directory_and_watches_the_heads_the_learner_writes() -> None:
    docs = render(OVERLAY)
    settings = _settings(docs)
    (claim,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # many pods and the learner mount it at once
    app_pod = _deployment(docs, "candidate-generation")["spec"]["template"]["spec"]
    learner_pod = _deployment(docs, "reranker-learner")["spec"]["template"]["spec"]

    def mount(pod: dict, container: dict) -> PurePosixPath:
        volumes = {v["name"]: v for v in pod["volumes"]}
        (path,) = [m["mountPath"] for m in container["volumeMounts"]
                   if volumes[m["name"]].get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]]
        return PurePosixPath(path)

    side = sidecar(docs)
    (learner,) = learner_pod["containers"]
    shared = mount(app_pod, side)
    assert mount(learner_pod, learner) == shared  # same paths on both sides
    env = [e["name"] for e in side["env"]]
    log_dir = next(e for e in side["env"] if e["name"] == "RERANKER_TRAINING_LOG_DIR")["value"]
    pod_name = next(e for e in side["env"] if e["name"] == "POD_NAME")
    assert pod_name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env.index("POD_NAME") < env.index("RERANKER_TRAINING_LOG_DIR")  # $(POD_NAME) is expanded only then
    assert PurePosixPath(log_dir) == PurePosixPath(settings.learning.learn_log_root) / "$(POD_NAME)"  # one subdirectory per pod
    assert PurePosixPath(settings.learning.learn_log_root).is_relative_to(shared)
    arms = {name: PurePosixPath(path) for name, _, path in settings.ranking.parsed_experiment_arms()}
    assert {settings.learning.learn_main_arm, settings.learning.learn_canary_arm} <= set(arms) and not settings.ranking.head_path
    assert all(path.is_relative_to(shared) for path in arms.values())
    assert PurePosixPath(settings.learning.learn_history_path).is_relative_to(shared)  # survives the learner's restarts
    assert settings.learning.online_metrics_window_seconds > 0 and settings.ranking.head_reload_seconds > 0


def test_one_learner_at_a_time_running_learn_on_the_sidecars_settings() -> None:
    docs = render(OVERLAY)
    learner = _deployment(docs, "reranker-learner")
    assert learner["spec"]["replicas"] == 1 and learner["spec"]["strategy"]["type"] == "Recreate"
    (container,) = learner["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["reranker", "learn", "run"]
    (config,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("reranker-config")]
    assert container["envFrom"] == sidecar(docs)["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    assert container["image"] == sidecar(docs)["image"]  # the same code and model on both sides
    assert container["securityContext"]["readOnlyRootFilesystem"]
    port = int(_settings(docs).learning.learn_metrics_address.rpartition(":")[2])
    assert [p["containerPort"] for p in container["ports"]] == [port]
