import os
import sys

# tests import the helpers in this folder as plain modules
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402


@pytest.fixture
def experimental_lean_bulk(monkeypatch):
    """Lets a test force the gated algo="lean_bulk" (tokenweave/env.py: experimental_lean_bulk)."""
    monkeypatch.setenv("TOKENWEAVE_EXPERIMENTAL_LEAN_BULK", "1")


@pytest.fixture
def user_config(tmp_path, monkeypatch):
    """A user config file path named by TOKENWEAVE_CONFIG (not created), with tokenweave.tuning's cache cleared."""
    from tokenweave import tuning

    path = tmp_path / "user-config.json"
    monkeypatch.setenv("TOKENWEAVE_CONFIG", str(path))
    tuning._all_entries.cache_clear()
    yield path
    tuning._all_entries.cache_clear()
