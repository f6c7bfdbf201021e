"""Tiny offline pipelines of every family, built once per test session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    return tmp_path_factory.mktemp("tiny-pipelines")


@pytest.fixture(scope="session")
def tiny(tiny_root):
    """``tiny("sd3")`` -> Path of a saved tiny pipeline folder (built once)."""
    from sidflow.testing import tiny_pipeline

    return lambda family: tiny_pipeline(family, tiny_root)
