"""Shared pytest configuration for atmoe's tests."""

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: slow test using the real embedded SmolLM2 base")
