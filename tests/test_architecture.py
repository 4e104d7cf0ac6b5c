"""The house's rooms: no import cycle, each package keeps its rule, no module over 300 lines.

Read from the source by :mod:`tests.import_graph` (which says what counts as an import);
a rule is one line of :data:`ROOMS` (``only=`` for a room limited to the standard library
and a few packages), and a package in it takes part in the package-cycle check.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.import_graph import Room, Tree, cycles, line_counts

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("service", "handlers")  # where the rules hold
GENERATED = ("service/_proto",)  # written by `make protos`
MAX_LINES = 300
SIZED = (*SOURCES, "bench")  # hand-written code held to MAX_LINES

TRANSPORT = ("grpc", "grpc_health", "grpc_reflection")
WIRE = (*TRANSPORT, "service._proto")  # the generated messages and stubs
TORCHSERVE = ("ts",)
MODEL_CODE = ("torch", "onnxruntime", "service.runtime", "service.models")

ROOMS = (
    Room(
        "service.engine",
        (
            *WIRE,
            *TORCHSERVE,
            "service.serving",
            "service.gateway",
            "service.runtime",
            "service.models",
            "handlers",
            "google.protobuf",
            "onnxruntime",
        ),
        "model-agnostic methods, masks and scores: torch, numpy, OpenCV, hosted by anything",
    ),
    Room(
        "service.runtime",
        (*WIRE, *TORCHSERVE, "service.serving", "service.gateway", "handlers"),
        "load-time model preparation and forwards, below every host",
    ),
    Room(
        "service.models",
        (*WIRE, *TORCHSERVE, "service.serving", "service.gateway", "handlers"),
        "the default model: data, architecture, training",
    ),
    Room(
        "service.serving",
        (*TRANSPORT, *TORCHSERVE, "service.gateway", "handlers"),
        "the request pipeline shared by every host, transport-free",
    ),
    Room(
        "service.gateway",
        (*TORCHSERVE, *MODEL_CODE, "cv2", "PIL", "handlers"),
        "a thin async front: it loads no model and decodes no image",
    ),
    Room("handlers", ("service.gateway",), "the TorchServe host; the gateway is another process"),
    Room(
        "service.protocol",
        (),
        "the wire contract every host shares: protobuf and the standard library",
        only=("google.protobuf", "service._proto"),
    ),
    Room(
        "service.client",
        (),
        "the light client a client-only install runs",
        only=("service.protocol", "service._proto", "google.protobuf", "grpc", "numpy", "PIL"),
    ),
)


@pytest.fixture(scope="module")
def tree() -> Tree:
    return Tree.read(REPO, SOURCES, GENERATED)


def test_no_import_cycle_between_modules(tree: Tree) -> None:
    found = cycles(tree.module_graph())
    assert not found, "module import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_no_import_cycle_between_packages(tree: Tree) -> None:
    graph = tree.package_graph(room.package for room in ROOMS)
    found = cycles(graph)
    assert not found, "package import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_every_room_keeps_its_rule(tree: Tree) -> None:
    assert {room.package for room in ROOMS} <= set(tree.modules), "a rule names no package"
    violations = tree.room_violations(ROOMS)
    assert not violations, "imports across room rules:\n" + "\n".join(violations)


def test_no_hand_written_module_over_the_limit() -> None:
    sizes = line_counts(REPO, SIZED, GENERATED)
    over = {path: n for path, n in sizes.items() if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines: " + ", ".join(
        f"{p} ({n})" for p, n in sorted(over.items(), key=lambda kv: -kv[1])
    )


def test_the_size_rule_counts_this_tree() -> None:
    sizes = line_counts(REPO, SIZED, GENERATED)
    assert "service/engine/engine.py" in sizes and "bench/run.py" in sizes
    assert not any(path.startswith(GENERATED) for path in sizes)
