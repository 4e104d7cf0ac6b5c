"""``saliency-serve concepts --archive``: the image folder's rules and the command's
refusals, without building an archive (the whole path runs in
tests/integration/test_concepts.py on a copy of the session's default archive)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from service.archive_code import ArchiveError
from service.archive_concepts import images_from_folder
from service.cli import main

LABELS = ("circle", "square", "star")
SIZE = (3, 16, 24)


def _write(path: Path, height: int, width: int, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((height, width, 3), value, np.uint8))


def test_images_are_read_per_label_and_resized_to_the_input(tmp_path: Path) -> None:
    _write(tmp_path / "star" / "a.png", 40, 30, 10)
    _write(tmp_path / "star" / "b.jpg", 8, 8, 200)
    _write(tmp_path / "circle" / "c.png", 16, 24, 99)
    (tmp_path / "circle" / "notes.txt").write_text("not an image, not read")
    found = images_from_folder(tmp_path, LABELS, SIZE)
    assert sorted(found) == [0, 2]  # square has no folder: no concepts
    assert found[2].shape == (2, 16, 24, 3) and found[0].shape == (1, 16, 24, 3)
    assert found[2][0].max() == 10 and found[2][1].min() >= 195  # name order, JPEG loss


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: None, "not a folder"),
        (lambda root: (root / "star").mkdir(parents=True), "no images"),
        (lambda root: _write(root / "oval" / "a.png", 8, 8, 0), "'oval' is not a label"),
        (lambda root: _write_text(root / "star" / "broken.png"), "cannot read"),
    ],
)
def test_bad_folders_are_refused_with_what_to_change(tmp_path: Path, make, message: str) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "images"
    make(root)
    with pytest.raises(ArchiveError, match=message):
        images_from_folder(root, LABELS, SIZE)


def _write_text(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not a PNG")


def test_the_command_refuses_missing_or_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["concepts"]) == 2
    assert "--archive and --images" in capsys.readouterr().err
    argv = ["concepts", "--archive", str(tmp_path / "x.mar"), "--images", str(tmp_path)]
    assert main([*argv, "--k", "0"]) == 2
    assert "--k and --crops" in capsys.readouterr().err
    (tmp_path / "x.mar").write_bytes(b"not a zip")
    assert main(argv) == 2
    assert "concepts refused" in capsys.readouterr().err
