"""The CLI tests' workspace: a tiny dense model, its data and its AQLM 2x8 quantization (one per module)."""

from __future__ import annotations

import pytest

from tests.support.cli import make_workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("cli"))
