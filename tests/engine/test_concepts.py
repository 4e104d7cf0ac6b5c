"""CRAFT concepts: factorisation, projection, Sobol importance, banks, hooks.

References are independent of the code under test: an exactly low-rank matrix whose
factors are known, the closed-form total indices of an additive head (float64), and a
model whose one relevant concept is known by construction.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from service.engine.concepts import (
    ConceptBank,
    build_bank,
    concept_importance,
    explain_concepts,
    fit_concepts,
    project,
    replaced_output,
)
from service.protocol.errors import DeadlineExceededError, UnsupportedMethodError

SIDE = 16


class ColourConcepts(nn.Module):
    """Channels 0-3 fire on red, 4-7 on green, 8-11 on blue; the logit reads only red.

    With the bank :data:`BANK` (one concept per colour), concept 0 is by construction the
    only one the logit depends on.
    """

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 12, 1, bias=False)
        with torch.no_grad():
            self.embed.weight.zero_()
            for colour in range(3):
                self.embed.weight[4 * colour : 4 * colour + 4, colour] = 1.0
        self.layer = nn.ReLU()
        self.register_buffer("reads", torch.tensor([1.0] * 4 + [0.0] * 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        red = self.layer(self.embed(x)).mean(dim=(2, 3)) @ self.reads
        return torch.stack([red, -red], dim=1)


BANK = np.kron(np.eye(3), np.ones((1, 4)))  # (3 concepts, 12 channels)


def _red_left_green_right() -> torch.Tensor:
    image = torch.zeros(1, 3, SIDE, SIDE)
    image[0, 0, :, : SIDE // 2] = 1.0
    image[0, 1, :, SIDE // 2 :] = 1.0
    image[0, 2] = 0.5
    return image


def _low_rank(seed: int, n: int = 80, k: int = 4, channels: int = 24) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    u = rng.uniform(0, 1, (n, k))
    w = rng.uniform(0, 1, (k, channels)) * (rng.uniform(size=(k, channels)) < 0.5)
    return u, w, u @ w


def test_nmf_reconstructs_exact_low_rank_data() -> None:
    _, _, data = _low_rank(0)
    u, w = fit_concepts(data, 4, seed=0)
    assert u.shape == (80, 4) and w.shape == (4, 24)
    assert (u >= 0).all() and (w >= 0).all()
    error = np.linalg.norm(data - u @ w) / np.linalg.norm(data)
    assert error < 0.02, error


def test_nmf_refuses_negative_data_and_bad_k() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        fit_concepts(-np.ones((5, 3)), 2, seed=0)
    with pytest.raises(ValueError, match="k must be"):
        fit_concepts(np.ones((5, 3)), 4, seed=0)


def test_projection_recovers_known_coefficients() -> None:
    u, w, data = _low_rank(1)
    np.testing.assert_allclose(project(data, w), u, atol=1e-8)


def test_total_indices_of_an_additive_head_match_the_closed_form() -> None:
    rng = np.random.default_rng(2)
    coefficients = rng.uniform(0, 1, (4, 5, 6))  # (h, w, k)
    bank = rng.uniform(0, 1, (6, 10))
    reads = rng.normal(size=10)

    def score(rebuilt: np.ndarray) -> np.ndarray:  # linear: sum_i m_i a_i
        return np.einsum("bchw,c->b", rebuilt, reads)

    # logit = sum_i m_i a_i with m_i ~ U[0, 1] independent: ST_i = a_i^2 / sum_j a_j^2.
    a = coefficients.sum(axis=(0, 1)) * (bank @ reads)
    expected = a**2 / np.sum(a**2)
    found = concept_importance(coefficients, bank, score, n_designs=1024, seed=0)
    np.testing.assert_allclose(found, expected, atol=0.03)


def test_the_only_concept_the_head_reads_gets_all_the_importance() -> None:
    model = ColourConcepts().eval()
    image = _red_left_green_right()
    for target in (0, 1):
        found = explain_concepts(model, model.layer, image, target, BANK, top=3, n_designs=64)
        assert found[0].concept == 0
        assert found[0].importance == pytest.approx(1.0, abs=0.05)
        assert all(abs(c.importance) < 1e-9 for c in found[1:])
    maps = {c.concept: c.map for c in found}
    assert maps[0].shape == (SIDE, SIDE)
    # Red is on the left, green on the right: each concept's map says where it is.
    assert maps[0][:, : SIDE // 2 - 1].min() > maps[0][:, SIDE // 2 + 1 :].max()
    assert maps[1][:, SIDE // 2 + 1 :].min() > maps[1][:, : SIDE // 2 - 1].max()
    np.testing.assert_allclose(maps[2], 0.5 * 1.0, atol=1e-6)  # blue 0.5 everywhere


def test_top_limits_the_answer_and_orders_by_importance() -> None:
    rng = np.random.default_rng(3)
    model = ColourConcepts().eval()
    with torch.no_grad():
        model.reads.copy_(torch.from_numpy(np.repeat([3.0, 1.0, 0.2], 4)).float())
    image = torch.from_numpy(rng.uniform(0, 1, (1, 3, SIDE, SIDE))).float()
    found = explain_concepts(model, model.layer, image, 0, BANK, top=2, n_designs=64)
    assert [c.concept for c in found] == [0, 1]
    assert found[0].importance > found[1].importance > 0


def test_same_seed_same_answer_other_seed_other_design() -> None:
    rng = np.random.default_rng(4)
    coefficients = rng.uniform(0, 1, (3, 3, 4))
    bank = rng.uniform(0, 1, (4, 6))

    def score(rebuilt: np.ndarray) -> np.ndarray:  # interactions: not additive
        flat = rebuilt.sum(axis=(2, 3))
        return flat[:, 0] * flat[:, 1] + np.sin(flat[:, 2])

    first = concept_importance(coefficients, bank, score, n_designs=32, seed=5)
    again = concept_importance(coefficients, bank, score, n_designs=32, seed=5)
    other = concept_importance(coefficients, bank, score, n_designs=32, seed=6)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_hooks_are_removed_on_success_and_on_failure() -> None:
    model = ColourConcepts().eval()
    image = _red_left_green_right()
    explain_concepts(model, model.layer, image, 0, BANK, top=1, n_designs=8)
    assert not model.layer._forward_hooks

    def late() -> None:
        raise DeadlineExceededError("deadline exceeded")

    with pytest.raises(DeadlineExceededError):
        explain_concepts(model, model.layer, image, 0, BANK, top=1, n_designs=8, check=late)
    assert not model.layer._forward_hooks

    wrong = torch.zeros(1, 12, 2, 2)
    with (
        pytest.raises(UnsupportedMethodError, match="cannot be replaced"),
        replaced_output(model.layer, wrong),
    ):
        model(image)
    assert not model.layer._forward_hooks


def test_a_bank_of_other_width_is_refused_before_the_design_runs() -> None:
    model = ColourConcepts().eval()
    calls = 0

    def counting(_module: nn.Module, _args: object, _out: object) -> None:
        nonlocal calls
        calls += 1

    handle = model.layer.register_forward_hook(counting)
    try:
        with pytest.raises(UnsupportedMethodError, match="channels"):
            explain_concepts(model, model.layer, _red_left_green_right(), 0, np.ones((2, 5)), top=1)
    finally:
        handle.remove()
    assert calls == 1  # the one forward that read the activations, no design forward


def _colour_images(seed: int, n: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, (2, n, SIDE * 2, SIDE * 2, 3), dtype=np.uint8)
    images[0, :, :SIDE, :, 0] = 255  # class 0: red top half
    images[1, :, :, :SIDE, 1] = 255  # class 1: green left half
    return {0: images[0], 1: images[1]}


def test_bank_is_deterministic_non_negative_and_round_trips(tmp_path: Path) -> None:
    model = ColourConcepts().eval()
    images = _colour_images(0, 6)
    kwargs = {"k": 3, "crops_per_image": 4, "typical": 2, "thumbnail": 16, "seed": 1}
    bank = build_bank(model, "layer", images, **kwargs)  # type: ignore[arg-type]
    again = build_bank(model, "layer", images, **kwargs)  # type: ignore[arg-type]
    assert sorted(bank.classes) == [0, 1] and bank.crop_size == SIDE
    for label, concepts in bank.classes.items():
        assert concepts.bank.shape == (3, 12) and (concepts.bank >= 0).all()
        assert np.array_equal(concepts.bank, again.classes[label].bank)
        assert concepts.crops == again.classes[label].crops
        assert [len(pngs) for pngs in concepts.crops] == [2, 2, 2]
        thumb = cv2.imdecode(np.frombuffer(concepts.crops[0][0], np.uint8), cv2.IMREAD_COLOR)
        assert thumb.shape == (16, 16, 3)
    for name, data in bank.to_files().items():
        (tmp_path / name).write_bytes(data)
    read = ConceptBank.read(tmp_path)
    assert read is not None and read.meta() == bank.meta()
    for label, concepts in bank.classes.items():
        np.testing.assert_array_equal(read.classes[label].bank, concepts.bank)
        assert read.classes[label].crops == concepts.crops
    assert ConceptBank.read(tmp_path / "absent") is None


def test_bank_concepts_separate_what_the_layer_separates() -> None:
    # A red square and a blue square on black: half-size crops hold red only, blue only,
    # both or neither, so the two pure colours are the (unique) non-negative factors.
    images = np.zeros((8, SIDE * 2, SIDE * 2, 3), dtype=np.uint8)
    images[:, 2:12, 2:12, 0] = 255
    images[:, 20:30, 20:30, 2] = 255
    model = ColourConcepts().eval()
    bank = build_bank(model, "layer", {0: images}, k=2, crops_per_image=12, seed=0)
    rows = bank.classes[0].bank / bank.classes[0].bank.sum(axis=1, keepdims=True)
    red, blue = rows[:, :4].sum(axis=1), rows[:, 8:].sum(axis=1)
    assert sorted([red.argmax(), blue.argmax()]) == [0, 1]
    assert red.max() > 0.95 and blue.max() > 0.95
