"""``archive`` records a model's CAM layer and attention, and its code and requirements travel.

Each archive here is a real ``.mar`` (torch-model-archiver), unpacked and loaded as a
TorchServe worker loads it (``load_bundle``); serving it with TorchServe is
``tests/integration/test_zoo_serving.py``'s part.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from service.archive import ArchiveError, build_archive
from service.engine.errors import UnsupportedMethodError
from service.model_requirements import RequirementsError, check_requirements
from service.models.zoo import eager_spec
from service.runtime.artifacts import META_FILE, load_bundle
from service.serving.pipeline import Explainer

SIZE = 32
LABELS = ["a", "b", "c"]


def zoo_spec(name: str) -> dict[str, Any]:
    return eager_spec(name, "tiny", len(LABELS), SIZE)


def archive(tmp_path: Path, eager: dict[str, Any], **options: Any) -> tuple[Path, list[str]]:
    """Build the archive; return its unpacked folder and what ``archive`` said."""
    said: list[str] = []
    mar = build_archive(
        name="m",
        eager=eager,
        exported=None,
        labels=LABELS,
        input_size=(3, SIZE, SIZE),
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        out_dir=tmp_path / "store",
        say=said.append,
        **{"target_layer": None, **options},
    )
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(mar) as packed:
        packed.extractall(unpacked)
    return unpacked, said


def test_a_vit_gets_its_token_layer_and_attention_found_and_recorded(tmp_path: Path) -> None:
    folder, said = archive(tmp_path, zoo_spec("vit_s16_sdpa_reg4"))
    meta = json.loads((folder / META_FILE).read_text())
    layer = meta["cam_layer"]
    assert (layer["name"], layer["kind"], layer["grid"], layer["prefix_tokens"]) == (
        "model.blocks.1",
        "tokens",
        [4, 4],
        5,
    )
    assert layer["chosen"] == "found" and meta["target_layer"] == "model.blocks.1"
    assert meta["attention"]["prefix_tokens"] == 5 and len(meta["attention"]["layers"]) == 2
    assert said[0].startswith(
        "CAM layer: blocks.1 (tokens 4x4, 5 class/register tokens dropped), found automatically"
    )
    assert said[0].endswith("override with --target-layer")
    assert said[1].startswith("attention: 2 self-attention layers")
    info = Explainer(load_bundle(folder)).model_info()
    assert (info.cam_layer.name, info.cam_layer.kind, info.cam_layer.chosen) == (
        "model.blocks.1",
        "tokens",
        "found",
    )
    assert info.attention.startswith("2 self-attention layers")
    assert all(m.available and not m.reason for m in info.methods)


def test_the_engine_serves_the_recorded_layer_not_a_new_search(tmp_path: Path) -> None:
    folder, _ = archive(tmp_path, zoo_spec("vit_s16_sdpa_reg4"))
    meta = json.loads((folder / META_FILE).read_text())
    meta["cam_layer"] = {**meta["cam_layer"], "name": "model.blocks.0", "how": "edited"}
    (folder / META_FILE).write_text(json.dumps(meta))
    engine = load_bundle(folder).engine
    assert engine.target_layer_name == "model.blocks.0" and engine.cam_layer is not None
    assert engine.cam_layer.how == "edited"


def test_a_given_layer_is_checked_and_recorded_as_given(tmp_path: Path) -> None:
    # At 32 px the tiny ResNet's layer4 is 1x1, no map; layer3 is 2x2.
    folder, said = archive(tmp_path, zoo_spec("resnet18"), target_layer="layer3")
    layer = json.loads((folder / META_FILE).read_text())["cam_layer"]
    assert (layer["name"], layer["kind"], layer["chosen"]) == ("model.layer3", "spatial", "given")
    assert layer["grid"] == [2, 2]
    assert said[0] == "CAM layer: layer3 (spatial map 32x2x2), as given with --target-layer"


@pytest.mark.parametrize(
    ("name", "layer", "match"),
    [
        ("vit_s16", "blocks.1", "patch tokens .* do not reach the logits"),
        ("efficientnet_b0", "features.0.2", r"runs \d+ times per forward"),
        ("resnet18", "layer9", "no layer named"),
        ("resnet18", "layer4", r"outputs \(1, 64, 1, 1\): neither a spatial map"),
    ],
    ids=["blank_tokens", "shared_activation", "missing", "one_cell_map"],
)
def test_a_given_layer_that_cannot_be_one_refuses_the_archive(
    tmp_path: Path, name: str, layer: str, match: str
) -> None:
    with pytest.raises(ArchiveError, match=f"--target-layer {layer}: .*{match}"):
        archive(tmp_path, zoo_spec(name), target_layer=layer)
    assert not (tmp_path / "store" / "m.mar").exists()


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


MLP = """
import torch
from torch import nn
from mlp_parts import width  # a package folder shipped beside this file


class Net(nn.Module):
    def __init__(self, seeded: bool = True):
        super().__init__()
        if seeded:
            torch.manual_seed(0)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, width()), nn.ReLU(),
                                  nn.Linear(width(), 3))

    def forward(self, x):
        return self.body(x)
"""


def test_a_model_with_neither_archives_and_says_why_cam_and_attention_are_off(
    tmp_path: Path,
) -> None:
    code = tmp_path / "code"
    model_file = write(code, "mlp.py", MLP)
    package = code / "mlp_parts"
    write(package, "__init__.py", "def width():\n    return 8\n")
    eager = {"module": "mlp.py", "class": "Net", "kwargs": {}, "weights": None}
    folder, said = archive(tmp_path, eager, files=[model_file, package])
    assert (folder / "mlp_parts" / "__init__.py").is_file()  # the folder kept its name
    assert said[0].startswith("CAM layer: none, so CAM methods are unavailable: no CAM layer")
    assert said[1].startswith("attention: none, so attention methods are unavailable")
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["cam_layer"] is None and meta["attention"] is None
    bundle = load_bundle(folder)  # the model file imports its package from the model folder
    info = Explainer(bundle).model_info()
    for method in info.methods:
        if method.name in ("grad_cam", "grad_cam_pp"):
            assert not method.available and method.reason.startswith("no CAM layer")
        elif method.name in ("attention_rollout", "gradient_weighted_attention"):
            assert not method.available and "no attention layers" in method.reason
    assert not info.HasField("cam_layer") and info.attention == ""
    with pytest.raises(UnsupportedMethodError, match="unavailable for this model: no CAM layer"):
        bundle.engine.explain(torch.rand(1, 3, SIZE, SIZE), [1], "grad_cam")


def test_weights_drawn_at_construction_without_weights_refuse_the_archive(
    tmp_path: Path,
) -> None:
    code = tmp_path / "code"
    files = [write(code, "mlp.py", MLP), code / "mlp_parts"]
    write(code / "mlp_parts", "__init__.py", "def width():\n    return 8\n")
    eager = {"module": "mlp.py", "class": "Net", "kwargs": {"seeded": False}, "weights": None}
    with pytest.raises(ArchiveError, match="draws random weights when built"):
        archive(tmp_path, eager, files=files)


def test_a_missing_import_without_requirements_says_what_to_do(tmp_path: Path) -> None:
    model_file = write(tmp_path / "code", "net.py", "import not_installed_anywhere\n")
    eager = {"module": "net.py", "class": "Net", "kwargs": {}, "weights": None}
    with pytest.raises(ArchiveError, match=r"imports 'not_installed_anywhere'.*--requirements"):
        archive(tmp_path, eager, files=[model_file])


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("torch==2.5.0", "server runs torch 2.13.0, which a model may not change"),
        ("torch>=2.14", "server runs torch 2.13.0"),
        ("torch @ https://example.org/torch.whl", "server runs torch 2.13.0"),
        ("torchvision", "brings its own torch"),
        ("TorchAudio==2.13.0", "brings its own torch"),
        ("-r other.txt", "pip options and nested files are not accepted"),
        ("--index-url https://example.org/simple", "pip options"),
        ("einops >=", "not a requirement"),
    ],
)
def test_requirements_that_would_replace_the_servers_torch_are_refused(
    tmp_path: Path, line: str, match: str
) -> None:
    path = write(tmp_path, "requirements.txt", f"einops\n{line}\n")
    with pytest.raises(RequirementsError, match=f"requirements.txt line 2 .*{match}"):
        check_requirements(path)
    eager = zoo_spec("vit_s16_sdpa_reg4")
    with pytest.raises(ArchiveError, match=f"--requirements refused: .*{match}"):
        archive(tmp_path, eager, requirements=path)


def test_requirements_the_server_can_install_are_kept(tmp_path: Path) -> None:
    text = (
        "# the model's own\neinops>=0.7  # reshapes\n\n"
        "torch==2.13.0\ntimm[all]<2; python_version>'3'\n"
    )
    path = write(tmp_path, "requirements.txt", text)
    assert check_requirements(path) == [
        "einops>=0.7",
        "torch==2.13.0",
        'timm[all]<2; python_version > "3"',
    ]
