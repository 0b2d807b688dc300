"""Tiny SDXL and SD1.5 pipeline folders, built once per test session."""

from pathlib import Path

import pytest

from pipeline.models.tiny import build_tiny_sd15, build_tiny_sdxl


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny_sdxl", seed=0)


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory) -> Path:
    return build_tiny_sd15(tmp_path_factory.mktemp("models") / "tiny_sd15", seed=0)
