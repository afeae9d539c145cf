"""Render every kustomization under k8s/ and validate it offline against the Kubernetes schemas.

`make k8s-validate` runs this; so does tests/test_deploy.py (the test lane, hence CI). Each of
OVERLAYS is rendered with `kubectl kustomize` (into build/k8s/<name>.yaml) and every document is
validated in strict mode (unknown fields rejected) with kubernetes-validate against the supported
floor, Kubernetes 1.29 (the first with native sidecars on by default: 1.27's schema rejects the
sidecar's `restartPolicy: Always`, 1.28 has it behind an alpha feature gate), and the newest version
kubernetes-validate knows.

Custom resources have no schema in kubernetes-validate: the PodMonitor is checked by hand here
(its selector must select the pods the sidecar was added to, its port must be the sidecar's).
Exit status 0 when everything is valid, 1 otherwise.

    PYTHONPATH=$PWD python scripts/k8s_validate.py [--versions 1.29.0 1.37.0]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
OVERLAYS = ("base", "overlays/bypass", "overlays/gpu", "overlays/learner", "examples/existing-app")
FLOOR = "1.29.0"
VERSIONS = (FLOOR, kubernetes_validate.latest_version())
POD_MONITOR = ("monitoring.coreos.com/v1", "PodMonitor")


def render(overlay: str, kubectl: str = "kubectl") -> str:
    out = subprocess.run([kubectl, "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"kubectl kustomize k8s/{overlay} failed: {out.stderr.strip()}")
    return out.stdout


def check_pod_monitor(monitor: dict[str, Any], docs: list[dict[str, Any]]) -> list[str]:
    """The PodMonitor selects pods that carry the sidecar, on a port the sidecar exposes."""
    problems = []
    selector = monitor.get("spec", {}).get("selector", {}).get("matchLabels", {})
    endpoints = monitor.get("spec", {}).get("podMetricsEndpoints", [])
    if not selector or not endpoints:
        return ["PodMonitor needs spec.selector.matchLabels and spec.podMetricsEndpoints"]
    selected = [d for d in docs if d.get("kind") == "Deployment"
                and selector.items() <= d["spec"]["template"]["metadata"].get("labels", {}).items()]
    if not selected:
        problems.append(f"PodMonitor selector {selector} selects no Deployment's pods")
    for deployment in selected:
        pod = deployment["spec"]["template"]["spec"]
        ports = {p.get("name") for c in pod.get("initContainers", []) + pod.get("containers", []) for p in c.get("ports", [])}
        for endpoint in endpoints:
            if endpoint.get("port") not in ports:
                problems.append(f"PodMonitor port {endpoint.get('port')!r} is not a port of {deployment['metadata']['name']}")
    return problems


def validate(text: str, versions: tuple[str, ...]) -> list[str]:
    """Problems found in one rendered kustomization (empty when it is valid)."""
    docs = [d for d in yaml.safe_load_all(text) if d]
    problems: list[str] = []
    for doc in docs:
        what = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if (doc.get("apiVersion"), doc.get("kind")) == POD_MONITOR:
            problems += [f"{what}: {p}" for p in check_pod_monitor(doc, docs)]
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                problems.append(f"{what} at {version}: {exc.message} (at {'.'.join(map(str, exc.path))})")
            except kubernetes_validate.SchemaNotFoundError:
                problems.append(f"{what}: no schema for {doc.get('apiVersion')} {doc.get('kind')} at {version}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--versions", nargs="+", default=list(VERSIONS), help="Kubernetes versions to validate against")
    parser.add_argument("--out", default=str(REPO / "build" / "k8s"), help="directory for the rendered manifests")
    args = parser.parse_args(argv)
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        print("k8s-validate: kubectl (with its built-in kustomize) is needed to render the overlays", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = False
    for overlay in OVERLAYS:
        try:
            text = render(overlay, kubectl)
        except RuntimeError as exc:
            print(f"k8s/{overlay}: {exc}", file=sys.stderr)
            failed = True
            continue
        (out / f"{overlay.replace('/', '-')}.yaml").write_text(text)
        problems = validate(text, tuple(args.versions))
        for problem in problems:
            print(f"k8s/{overlay}: {problem}", file=sys.stderr)
        failed = failed or bool(problems)
        if not problems:
            print(f"k8s/{overlay}: valid at Kubernetes {', '.join(args.versions)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
