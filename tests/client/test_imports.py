"""What each room may import, checked in fresh interpreters that cannot import the rest.

A meta-path finder refuses the blocked top-level packages, as if they were not installed:
the client and the protocol must work in a client-only install (grpcio, protobuf, numpy,
Pillow), the protocol's base modules with the standard library alone, and the engine
without protobuf or gRPC.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SERVER_ONLY = (
    *("torch", "cv2", "onnxruntime", "onnx", "ts", "prometheus_client", "grpc_health"),
    *("skimage", "scipy"),  # LIME / KernelSHAP superpixels
)


def run_blocked(blocked: tuple[str, ...], script: str) -> str:
    """Run ``script`` in a new interpreter where ``blocked`` packages cannot be imported."""
    prelude = textwrap.dedent(
        f"""
        import importlib.abc, sys
        BLOCKED = {set(blocked)!r}
        class Blocker(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
                return None
        sys.meta_path.insert(0, Blocker())
        """
    )
    epilogue = textwrap.dedent(
        """
        loaded = sorted({m.split(".")[0] for m in sys.modules} & BLOCKED)
        assert not loaded, loaded
        print("OK")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(script) + epilogue],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and result.stdout.endswith("OK\n"), result.stderr[-3000:]
    return result.stdout


def test_the_blocker_really_blocks() -> None:
    # Without this, every test below would pass in a venv that simply imports nothing.
    out = run_blocked(
        ("torch",),
        """
        try:
            import torch
        except ModuleNotFoundError as exc:
            print("blocked" if "blocked" in str(exc) else "missing")
        """,
    )
    assert out.startswith("blocked")


def test_client_protocol_and_cli_work_without_the_server_install() -> None:
    run_blocked(
        SERVER_ONLY,
        """
        import io
        import numpy as np
        from PIL import Image
        import service, service._proto
        from service.protocol import errors, events, families, info, limits, names, params, request
        from service.client import (
            AsyncSaliencyClient, SaliencyClient, decode_map, decode_mask, draw_box, explain_request,
            overlay,
        )
        from service._proto.saliency.v1 import saliency_pb2 as pb
        from service.cli import build_parser, main
        from service.client.report import html_report

        # A request, through the protocol's names and back.
        png = io.BytesIO()
        Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(png, "PNG")
        req = explain_request(
            png.getvalue(),
            methods=["grad_cam", ("integrated_gradients", {"n_steps": 8})],
            mask="grabcut",
            mask_params={"iterations": 3},
            scores=["deletion_auc"],
            map_encoding="float16",
        )
        query = request.ExplainQuery.from_pb(pb.ExplainRequest.FromString(req.SerializeToString()))
        assert [m.name for m in query.methods] == ["grad_cam", "integrated_gradients"]
        assert query.methods[1].params == {"n_steps": "8"}
        assert (query.mask.name, query.mask.params) == ("grabcut", {"iterations": "3"})
        assert query.scores == ("deletion_auc",) and query.map_encoding == "float16"
        try:
            explain_request(b"x", methods=["deconvnet"])
            raise AssertionError("an unknown method was accepted")
        except errors.InvalidInputError as exc:
            assert "known: vanilla_gradient" in str(exc)

        # A PNG8 map and a 1-bit mask, made with Pillow, decoded.
        ramp = np.arange(20, dtype=np.uint8).reshape(4, 5) * 13
        buf = io.BytesIO()
        Image.fromarray(ramp, "L").save(buf, "PNG")
        saliency = pb.SaliencyMap(width=5, height=4, encoding=pb.MAP_ENCODING_PNG8,
                                  data=buf.getvalue(), value_min=-1.0, value_max=1.0)
        values = decode_map(saliency)
        np.testing.assert_allclose(values, -1.0 + ramp / 255.0 * 2.0, atol=1e-6)
        bits = np.zeros((4, 5), bool)
        bits[1:3, 2:4] = True
        buf = io.BytesIO()
        Image.fromarray(bits).convert("1").save(buf, "PNG")
        mask = decode_mask(pb.Mask(width=5, height=4, png=buf.getvalue()))
        np.testing.assert_array_equal(mask, bits)
        tinted = overlay(np.zeros((4, 5, 3), np.uint8), values)
        assert tinted.shape == (4, 5, 3) and tinted.dtype == np.uint8
        boxed = draw_box(np.zeros((4, 5, 3), np.uint8), pb.Box(x_min=1, y_min=1, x_max=3, y_max=2))
        assert boxed[1, 1:4].all() and not boxed[0].any()

        # The CLI parses, with choices from the wire enums; serving says what to install.
        args = build_parser().parse_args(
            ["explain", "x.png", "--method", "sobol", "--mask", "none", "--score", "mu_fidelity",
             "--param", "sobol.n_designs=16"])
        assert args.method == ["sobol"] and args.param == ["sobol.n_designs=16"]
        import contextlib
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(["serve"])
        assert code == 2, err.getvalue()
        assert "pip install 'saliency-serve[server]'" in err.getvalue(), err.getvalue()
        """,
    )


def test_protocol_base_modules_need_only_the_standard_library() -> None:
    run_blocked(
        (*SERVER_ONLY, "google", "grpc", "numpy", "PIL"),
        """
        from service.protocol import cost, errors, families, limits, params
        p = params.Param("k", "int", 3, "doc", minimum=1)
        assert cost.check_budget([cost.Item("x", cost.Cost(forwards=1))], limits.Limits())
        assert params.ParamSet("x", (p,)).resolve({"k": "4"})["k"] == 4
        assert errors.code_name(errors.TargetOutOfRangeError("t")) == "INVALID_ARGUMENT"
        assert limits.MAX_MESSAGE_BYTES > limits.GATEWAY_RECEIVE_BYTES
        assert families.METHOD.value_name("grad_cam") == "METHOD_GRAD_CAM"
        """,
    )


def test_the_engine_needs_no_protobuf_grpc_or_torchserve() -> None:
    run_blocked(
        ("google", "grpc", "ts", "onnxruntime", "prometheus_client"),
        """
        import service.engine.engine, service.engine.methods, service.engine.masks
        import service.engine.scores, service.engine.docs
        from service.engine.registry import MASKS, METHODS, SCORES
        assert METHODS.names() and MASKS.names() and SCORES.names()
        """,
    )


def test_the_gateway_needs_no_torch_onnxruntime_or_torchserve() -> None:
    run_blocked(
        ("torch", "cv2", "onnxruntime", "onnx", "ts", "PIL"),
        """
        from service.gateway.server import Gateway, GatewayConfig, run_gateway
        from service.stack import running_gateway, running_stack
        """,
    )
