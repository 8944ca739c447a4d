"""Shared fixtures: the real SmolLM2-135M (fetched once into $OWL_DEPLOY_HOME) and real text."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_collection_modifyitems(config, items):
    """``large`` tests (the 1.5B model, ≈9 GB RAM, minutes each) run only with OWL_DEPLOY_LARGE=1."""
    if os.environ.get("OWL_DEPLOY_LARGE") == "1":
        return
    skip = pytest.mark.skip(reason="large: set OWL_DEPLOY_LARGE=1 (`make test-large`)")
    for item in items:
        if "large" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The prepared fp32 safetensors folder of SmolLM2-135M (fetched on first use)."""
    from owl_deploy import assets

    return assets.ensure("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """``(model, tokenizer)`` of the real SmolLM2-135M, loaded once per session; do not mutate."""
    from owl_deploy.specs import load_model

    return load_model(smollm2_dir)


@pytest.fixture(scope="session")
def smollm2_export(smollm2_dir, tmp_path_factory):
    """``(folder, export report)``: SmolLM2-135M exported once per session (256-token context, every check:
    zeros, logits and 32 greedy tokens in both engines), for the tests that need a real deployment; read-only."""
    from owl_deploy.configs import ExportConfig
    from owl_deploy.export import export_model

    out = tmp_path_factory.mktemp("smol") / "odir"
    return out, export_model(smollm2_dir, out, ExportConfig(sequence_length=256, greedy_tokens=32))
