"""The images cannot be built here (no Docker engine): hold the Dockerfiles to their promises.

Same install as the Makefile (venv + constraints), torch at the constraints' pin, the GPU
image swaps in CUDA torch and onnxruntime-gpu of pyproject's onnxruntime version, the
default archive is built at image build time, and the final stage is non-root, carries no
build tools and has a health check.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.deploy.support import DOCKER, DOCKERFILES, K8S, REPO_ROOT

RUNTIME_PACKAGES = {"python3.11", "openjdk-17-jre-headless", "tini"}
BUILD_TOOLS = re.compile(
    r"\b(build-essential|gcc|g\+\+|make|cmake|git|curl|wget|[\w.+-]+-dev|python3\.11-venv)\b"
)


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [arg for o, arg in self.instructions if o == op]


def parse(path: Path) -> list[Stage]:
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: list[Stage] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        op, _, arg = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            words = arg.split()
            stages.append(Stage(base=words[0], name=words[2] if len(words) > 2 else None))
        elif stages:
            stages[-1].instructions.append((op, " ".join(arg.split())))
    return stages


def apt_packages(stage: Stage) -> set[str]:
    out: set[str] = set()
    for run in stage.all("RUN"):
        for m in re.finditer(r"apt-get install ((?:-\S+ )*)([^&;|]+)", run):
            out.update(w for w in m.group(2).split() if not w.startswith("-"))
    return out


def constraint_pin(package: str) -> str:
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        if m := re.match(rf"^{re.escape(package)}==([\w.]+)", line.strip()):
            return m.group(1)
    raise AssertionError(f"{package} is not pinned in constraints.txt")


def pyproject_pin(package: str) -> str:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    # The image installs the base dependencies and the `server` extra.
    deps = [*project["dependencies"], *project["optional-dependencies"]["server"]]
    for dep in deps:
        if m := re.match(rf"^{re.escape(package)}==([\w.]+)$", dep):
            return m.group(1)
    raise AssertionError(f"{package} is not pinned in pyproject.toml")


@pytest.fixture(params=DOCKERFILES, ids=lambda p: p.name)
def dockerfile(request: pytest.FixtureRequest) -> Path:
    return request.param


def test_both_images_exist() -> None:
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.gpu", "Dockerfile.cpu"}


def test_two_stages_on_one_pinned_base(dockerfile: Path) -> None:
    build, final = parse(dockerfile)
    assert build.name == "build" and final.name is None
    # The venv is copied across stages: same base image, same interpreter path.
    assert build.base == final.base
    assert ":" in final.base and not final.base.endswith(":latest")


def test_install_matches_the_makefile(dockerfile: Path) -> None:
    build, _ = parse(dockerfile)
    runs = " && ".join(build.all("RUN"))
    env = " ".join(build.all("ENV"))
    assert "python3.11 -m venv /opt/venv" in runs
    assert "PIP_CONSTRAINT=/src/constraints.txt" in env
    assert "pip install --no-cache-dir './[server]'" in runs  # the Makefile's extras, less dev
    args = dict(a.split("=", 1) for a in build.all("ARG") if "=" in a)
    assert args["TORCH_VERSION"] == constraint_pin("torch")
    assert '"torch==${TORCH_VERSION}"' in runs
    copied = " ".join(build.all("COPY"))
    for needed in ("pyproject.toml", "constraints.txt", "service/", "handlers/"):
        assert needed in copied


def test_gpu_image_swaps_in_cuda_builds() -> None:
    build, final = parse(DOCKER / "Dockerfile.gpu")
    # CUDA 13 runtime: the CUDA major of PyPI's onnxruntime-gpu and torch 2.13.0 builds.
    assert re.match(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu22\.04$", final.base)
    args = dict(a.split("=", 1) for a in build.all("ARG") if "=" in a)
    assert args["TORCH_INDEX_URL"] in (
        "https://pypi.org/simple",
        "https://download.pytorch.org/whl/cu130",
    )
    runs = " && ".join(build.all("RUN"))
    # onnxruntime-gpu of the very version pyproject pins for onnxruntime (unless overridden).
    assert args["ORT_GPU_VERSION"] == ""
    assert 'm.version("onnxruntime")' in runs
    assert "pip uninstall -y onnxruntime" in runs
    assert '"onnxruntime-gpu==${ORT_GPU_VERSION:-${ORT_VERSION}}"' in runs
    assert runs.index("pip uninstall -y onnxruntime") < runs.index("onnxruntime-gpu==")
    # The build fails unless torch is a CUDA build of the same CUDA major as ORT's.
    assert "torch.version.cuda" in runs and "ort.cuda_version" in runs
    assert pyproject_pin("onnxruntime")  # the version the build reads back


def test_cpu_image_uses_cpu_torch() -> None:
    build, _ = parse(DOCKER / "Dockerfile.cpu")
    args = dict(a.split("=", 1) for a in build.all("ARG") if "=" in a)
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert "onnxruntime-gpu" not in (DOCKER / "Dockerfile.cpu").read_text()


def test_default_archive_built_at_image_build_time(dockerfile: Path) -> None:
    build, final = parse(dockerfile)
    assert any("saliency-serve archive --default --out /models" in r for r in build.all("RUN"))
    assert "--from=build /models /models" in final.all("COPY")


def test_final_stage_is_lean_non_root_and_healthchecked(dockerfile: Path) -> None:
    _, final = parse(dockerfile)
    packages = apt_packages(final)
    assert packages == RUNTIME_PACKAGES
    for run in final.all("RUN"):
        assert not BUILD_TOOLS.search(run), run
        assert "pip install" not in run
    (user,) = final.all("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) >= 10000 and gid.isdigit()
    (health,) = final.all("HEALTHCHECK")
    assert '"/opt/saliency/healthcheck.py", "gateway"' in health
    assert "/opt/saliency/healthcheck.py" in " ".join(final.all("COPY"))
    # pip leaves the venv at the end of the build stage.
    build = parse(dockerfile)[0]
    assert "pip uninstall -y pip" in build.all("RUN")[-1]


def test_image_defaults_match_the_deployment(dockerfile: Path) -> None:
    _, final = parse(dockerfile)
    (entrypoint,) = final.all("ENTRYPOINT")
    (cmd,) = final.all("CMD")
    deployment = yaml.safe_load((K8S / "base" / "deployment.yaml").read_text())
    containers = {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}
    assert shlex.split(entrypoint.strip("[]").replace(",", " ")) == [
        "/usr/bin/tini",
        "--",
        "saliency-serve",
    ]
    assert shlex.split(cmd.strip("[]").replace(",", " ")) == containers["gateway"]["args"]
    assert containers["torchserve"]["args"][0] == "torchserve"
    env = " ".join(final.all("ENV"))
    for c in containers.values():
        for var in c.get("env", []):
            if var["name"] == "SALIENCY_SERVE_CACHE":
                assert var["value"].startswith("/tmp/")
    ts_args = containers["torchserve"]["args"]
    assert ts_args[ts_args.index("--run-dir") + 1].startswith("/tmp/")
    assert "HOME=/tmp" in env


def test_copy_sources_exist_and_pass_the_dockerignore(dockerfile: Path) -> None:
    ignore = Path(f"{dockerfile}.dockerignore")
    assert ignore.is_file(), "BuildKit reads <Dockerfile>.dockerignore next to the Dockerfile"
    allowed = [
        line[1:].rstrip("/") for line in ignore.read_text().splitlines() if line.startswith("!")
    ]
    assert "*" in ignore.read_text().splitlines()
    for stage in parse(dockerfile):
        for copy in stage.all("COPY"):
            if copy.startswith("--from="):
                continue
            *sources, _dest = copy.split()
            for src in sources:
                assert (REPO_ROOT / src).exists(), src
                assert src.rstrip("/") in allowed, f"{src} is excluded by {ignore.name}"
