"""tokenweave-tune end to end: a tiny tune on 2 GPUs, and on one GPU in the emulated world; the written file
loads through tokenweave.tuning.dispatch_config."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import tokenweave as tw
from tokenweave import tune, tuning

pytestmark = pytest.mark.gpu

if not (torch.cuda.is_available() and tw.HAS_EXTENSION):
    pytest.skip("needs a CUDA GPU and the tokenweave extension", allow_module_level=True)

TINY = ["--hidden", "1024", "--tokens", "1", "16", "256", "--calls", "5", "--replays", "3"]


def _check_entry(path, world, emulated):
    doc = json.loads(path.read_text())
    card = tuning.device_slug(0)
    (entry,) = doc["entries"]
    assert doc["device"] == card and entry["device"] == card and entry["emulated"] is emulated
    assert (entry["world_size"], entry["hidden"], entry["itemsize"]) == (world, 1024, 2)
    for field in ("torch", "git", "date", "source"):
        assert entry[field]
    times = entry["measured"]["1024"]
    assert all(us > 0 for us in times["two_shot"].values()) and times["one_shot"]["1"] > 0
    cfg = tuning.dispatch_config(card, world, 2, 1024)
    assert str(path) in cfg.source
    for field in ("one_shot_max_bytes", "lamport_max_bytes", "lean", "bytes_per_cta"):
        if field in entry:
            assert getattr(cfg, field) == entry[field], field
    return entry


def test_tiny_tune_on_two_gpus(user_config):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    env = dict(os.environ)  # a copy: the multicast switches stay as they are
    env.pop("TOKENWEAVE_CONFIG", None)
    res = subprocess.run([sys.executable, "-m", "tokenweave.tune", "--tp", "2", *TINY, "--out", str(user_config)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"export TOKENWEAVE_CONFIG={user_config.resolve()}" in res.stdout
    entry = _check_entry(user_config, 2, emulated=False)
    assert entry["gpus"] == 2


def test_tiny_emulated_tune_on_one_gpu(user_config, capsys):
    tune.main(["--emulated", "2", *TINY, "--out", str(user_config)])
    assert os.environ["TOKENWEAVE_CONFIG"] == str(user_config)  # restored after measuring without it
    assert "export TOKENWEAVE_CONFIG=" in capsys.readouterr().out
    entry = _check_entry(user_config, 2, emulated=True)
    assert entry["gpus"] == 1 and "emulated world of 2 ranks" in entry["source"]
