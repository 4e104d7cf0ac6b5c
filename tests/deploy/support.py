"""Helpers for the deploy tests: where the lint tools are, rendering overlays, finding objects."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS_DIR = K8S / "overlays"
DOCKER = DEPLOY / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))
DOCKERFILES = [p for p in DOCKERFILES if not p.name.endswith(".dockerignore")]
OVERLAYS = sorted(p.name for p in OVERLAYS_DIR.iterdir() if (p / "kustomization.yaml").is_file())
GPU_OVERLAYS = [o for o in OVERLAYS if o.startswith("gpu")]
CPU_OVERLAYS = [o for o in OVERLAYS if o.startswith("cpu")]
# Kubernetes versions every object is validated against: the oldest we support and the
# newest that kubernetes-validate ships schemas for.
K8S_VERSIONS = ("1.30", "1.37")

INSTALL_HINT = "run `make deploy-tools` (installs deploy/requirements-tools.txt into .venv-tools)"


def tools_bin() -> Path:
    """The lint tools' bin directory: $SALIENCY_TOOLS_BIN or <repo>/.venv-tools/bin."""
    return Path(os.environ.get("SALIENCY_TOOLS_BIN") or REPO_ROOT / ".venv-tools" / "bin")


def tool(name: str) -> str:
    """Path of a tool from the tools venv; fails the test (never skips) when it is missing."""
    path = tools_bin() / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"{name} not found at {path}: {INSTALL_HINT}", pytrace=False)
    return str(path)


def run_tool(
    args: list[str], *, timeout: float = 120, check: bool = False, cwd: Path = REPO_ROOT
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    # The tools venv's own bin first (checkov and kubectl spawn helpers by name).
    env["PATH"] = f"{tools_bin()}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}",
            pytrace=False,
        )
    return proc


@dataclass
class Rendered:
    overlay: str
    text: str
    objects: list[dict[str, Any]] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o.get("kind") == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [o for o in self.of_kind(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, (
            f"{self.overlay}: expected one {kind} {name or ''}, got {len(found)}"
        )
        return found[0]

    @property
    def deployment(self) -> dict[str, Any]:
        return self.one("Deployment", "saliency-serve")

    @property
    def pod_spec(self) -> dict[str, Any]:
        return self.deployment["spec"]["template"]["spec"]

    def container(self, name: str) -> dict[str, Any]:
        found = [c for c in self.pod_spec["containers"] if c["name"] == name]
        assert len(found) == 1, f"{self.overlay}: no single container {name}"
        return found[0]


def render(overlay: str) -> Rendered:
    kubectl = tool("kubectl")
    proc = run_tool([kubectl, "kustomize", str(OVERLAYS_DIR / overlay)], check=True)
    objects = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return Rendered(overlay=overlay, text=proc.stdout, objects=objects)
