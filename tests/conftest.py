"""Shared pytest configuration for atmoe's tests."""

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: slow test using the real embedded SmolLM2 base")


import os

# Tests never reach a hub: fail fast instead of retrying a network that is not there.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
