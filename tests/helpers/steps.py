"""A few plain SGD steps on a model, for tests that need gradients past the zero-initialised heads."""

from typing import Dict, List

import torch


def sgd_steps(model: torch.nn.Module, batch: List[dict], steps: int = 2, lr: float = 1e-2) -> Dict:
    """Trains ``model`` on ``batch`` for ``steps`` SGD steps and returns the last step's losses.

    The box heads' last layers start at zero, so at initialisation no gradient reaches the
    localisation path through them; one step opens it. Every loss must stay finite. The
    gradients are cleared afterwards, so the caller's next backward starts from zero.
    """
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        losses = model(batch)
        assert all(torch.isfinite(v) for v in losses.values()), losses
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    opt.zero_grad()
    return losses
