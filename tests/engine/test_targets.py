"""Target resolution: the predicted class by default, never class 0; clear range errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.engine.errors import InvalidInputError, TargetOutOfRangeError
from service.engine.targets import resolve_targets, top_k

LOGITS = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.5], [-2.0, -1.0, 4.0]])


def test_none_means_predicted_class() -> None:
    assert resolve_targets(LOGITS).tolist() == [1, 0, 2]
    assert resolve_targets(LOGITS, [None, None, None]).tolist() == [1, 0, 2]
    assert resolve_targets(LOGITS, [None, 2, None]).tolist() == [1, 2, 2]


def test_explicit_targets() -> None:
    result = resolve_targets(LOGITS, torch.tensor([2, 1, 0]))
    assert result.dtype == torch.int64 and result.tolist() == [2, 1, 0]
    numpy_ints = [np.int64(1), 0, 2]
    assert resolve_targets(LOGITS, numpy_ints).tolist() == [1, 0, 2]  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [[0, 3, 1], [-1, 0, 0]])
def test_out_of_range_names_the_valid_range(bad: list[int]) -> None:
    with pytest.raises(TargetOutOfRangeError, match=r"0\.\.2"):
        resolve_targets(LOGITS, bad)


@pytest.mark.parametrize(
    "bad", [[0, 1], [0.5, 1, 2], [True, 1, 2], ["1", 1, 2], torch.tensor([0.0, 1.0, 2.0])]
)
def test_malformed_targets(bad: object) -> None:
    with pytest.raises(InvalidInputError):
        resolve_targets(LOGITS, bad)  # type: ignore[arg-type]


def test_top_k() -> None:
    indices, probs = top_k(LOGITS, 2)
    assert indices.tolist() == [[1, 0], [0, 2], [2, 1]]
    # Softmax from its definition in float64 (the code uses torch.softmax in float32).
    logits = np.asarray(LOGITS.tolist(), dtype=np.float64)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected = np.take_along_axis(exp / exp.sum(axis=1, keepdims=True), indices.numpy(), axis=1)
    assert probs.dtype == torch.float32
    np.testing.assert_allclose(probs.numpy(), expected, rtol=1e-6)
    assert top_k(LOGITS, 10)[0].shape == (3, 3)
    with pytest.raises(InvalidInputError):
        top_k(LOGITS, 0)
