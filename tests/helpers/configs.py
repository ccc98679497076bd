"""Configs of the repository, loaded the way every entry point loads them."""

import os

from align_detr.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def config_path(name: str) -> str:
    """Absolute path of ``configs/<name>``."""
    return os.path.join(ROOT, "configs", name)


def repo_cfg(name: str, *opts):
    """The (unfrozen) config ``configs/<name>`` with ``KEY VALUE`` overrides."""
    return load_config(config_path(name), list(opts), freeze=False)


def tiny_cfg(*opts):
    """``configs/tiny_test.yaml``: the real architecture made tiny, on the CPU."""
    return repo_cfg("tiny_test.yaml", *opts)
