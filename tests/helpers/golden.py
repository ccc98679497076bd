"""The golden fixtures of tests/data (made by tools/make_equivalence_fixture.py from the official
code) and the model built from each, as tools/check_equivalence.py builds it."""

import os

import torch

from .configs import ROOT
from .scripts import load_script

check = load_script("tools/check_equivalence.py")


def golden_fixture(name: str):
    """The plain-dict contents of ``tests/data/<name>``."""
    return torch.load(os.path.join(ROOT, "tests", "data", name), weights_only=True)


def golden_model(name: str, tmp_path_factory):
    """(fixture, our model with their weights loaded through the checkpointer, a scratch dir)."""
    data = golden_fixture(name)
    tmp = str(tmp_path_factory.mktemp(name.rsplit(".", 1)[0]))
    return data, check.build_from_fixture(data, tmp), tmp


def batched_differences_without_padding_mask(data, tmp: str):
    """Their batched inference reads the padding as image; TEST_PADDING_MASK False reproduces
    that. Returns check_equivalence's differences on the two-image batch."""
    model = check.build_from_fixture(data, tmp, "MODEL.ALIGN_DETR.TEST_PADDING_MASK", "False")
    return check.compare_inference(model, data, "batched")
