"""The handler tests serve the same tiny model directory as the pipeline tests."""

from tests.serving.conftest import tiny_model_dir

__all__ = ["tiny_model_dir"]
