import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Every test starts from the same seed and a small thread count (the CI box has 2 cores)."""
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield
