# Copyright (c) align-detr contributors.
"""Seeds derived from several integers, and seeding of every RNG a training step draws from."""

import contextlib
import hashlib
import random

import numpy as np
import torch

__all__ = ["derive_seed", "seed_all_rngs", "seeded_rng"]


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (stable across processes and Python runs)."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seed_all_rngs(seed: int) -> None:
    """Seeds numpy, Python and torch (which also reseeds CUDA's default generators)."""
    np.random.seed(seed % (1 << 32))
    random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded_rng(seed: int):
    """Runs the block with numpy, Python and torch (CPU) RNGs seeded by ``seed``, then puts the
    previous states back, so the caller's random streams are left untouched."""
    np_state, py_state, torch_state = (
        np.random.get_state(),
        random.getstate(),
        torch.get_rng_state(),
    )
    seed_all_rngs(seed)
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
        torch.set_rng_state(torch_state)
