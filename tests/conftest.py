"""Fixtures shared by the tests (helpers live in tests/helpers)."""

import uuid

import pytest
import torch
from helpers import register_coco, unregister, write_coco

import align_detr.modeling  # noqa: F401  (registers the model with detectron2)


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Every test starts from the same seed and a small thread count (the CI box has 2 cores)."""
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield


@pytest.fixture
def tiny_dataset(tmp_path):
    """A registered 3-image, 2-class COCO dataset in a temp dir; yields its name."""
    name = f"tiny_coco_{uuid.uuid4().hex[:8]}"
    json_file = write_coco(str(tmp_path / "data"))
    register_coco(name, json_file, str(tmp_path / "data"))
    yield name
    unregister(name)
