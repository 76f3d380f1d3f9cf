"""Shared pytest configuration for atmoe's tests."""

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: slow test using the real embedded SmolLM2 base")


import os

# Tests never reach a hub: fail fast instead of retrying a network that is not there.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest single-threaded; on a shared, loaded CPU OpenMP spinning costs 100x (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
