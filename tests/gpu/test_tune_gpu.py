"""tokenweave-tune end to end: a tiny tune on 2 GPUs, and on one GPU in the emulated world and with only the
one-GPU stages (--no-allreduce); the written file loads through tokenweave.tuning (dispatch_config, norm_shape,
programmatic_launch), and every block shape written gives shape 0's bits."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import tokenweave as tw
from tokenweave import tune, tuning
from tokenweave._ext import _C

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


def _bits(t):
    return t.view(torch.int16)


def _norm_once(shape, x, residual, weight):
    """One call of the add + RMSNorm op in block shape ``shape`` (out poisoned, residual a copy)."""
    res, out = residual.clone(), torch.full_like(x, float("nan"))
    torch.ops.tokenweave.add_rmsnorm.default(x, res, weight, out, tune.EPS, shape)
    return out, res


def _inputs(rows, hidden, seed):
    gen = torch.Generator("cuda").manual_seed(seed)  # fresh random data, never zeros
    x = torch.randn(rows, hidden, generator=gen, device="cuda").to(torch.bfloat16)
    residual = torch.randn(rows, hidden, generator=gen, device="cuda").to(torch.bfloat16)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen, device="cuda")).to(torch.bfloat16)
    return x, residual, weight


def _check_one_gpu_sections(path, hiddens, tokens):
    """The "launch" and "norm" sections a tune wrote: read back by tokenweave.tuning, and bit-safe."""
    doc = json.loads(path.read_text())
    card = tuning.device_slug(0)
    tuning.clear_cache()
    (launch,) = [e for e in doc["launch"] if e["device"] == card]
    assert isinstance(launch["programmatic"], bool) and launch["gpus"] == 1
    times = launch["measured"][str(max(hiddens))]
    assert set(times) == {str(t) for t in tune.LAUNCH_TOKENS}
    assert all(us > 0 for m in times.values() for us in m.values())
    on, why = tuning.programmatic_launch(card)
    assert on is launch["programmatic"] and str(path) in why
    for e in doc.get("norm", []):
        assert e["device"] == card and e["shape"] > 0 and e["itemsize"] == 2 and e["measured"]
        for h in ([e["hidden"]] if "hidden" in e else [h for h in hiddens if h <= e["max_hidden"]]):
            for t in (e["min_tokens"], e.get("max_tokens", e["min_tokens"] + 7)):
                assert tuning.norm_shape(card, t, h, 2) == e["shape"], (e, h, t)
                for rows, seed in ((t, 1), (3, 2), (300, 3)):  # the shape's bits are shape 0's at other batches too
                    x, residual, weight = _inputs(rows, h, seed)
                    shaped, default = _norm_once(e["shape"], x, residual, weight), _norm_once(0, x, residual, weight)
                    family = [s for f in e.get("other_order", []) for s in (f if isinstance(f, list) else [f])]
                    if e["shape"] in family:  # its family serves every count: shape 0's up to the order
                        assert tune.same_but_order(shaped, default), (e, h, rows)
                        continue
                    for got, ref in zip(shaped, default):
                        assert torch.equal(_bits(got), _bits(ref)), (e, h, rows)
    # as dispatched (the file written first, then the shipped config): a row's result never depends on its batch
    for h in hiddens:
        rows = max(tokens) + 5
        x, residual, weight = _inputs(rows, h, 4)
        full_res = residual.clone()
        full = tw.add_rmsnorm(x, full_res, weight, tune.EPS)
        for t in sorted(set(tokens) | {1, 2, max(tokens) - 1, max(tokens) + 1}):
            res = residual[:t].clone()
            out = tw.add_rmsnorm(x[:t], res, weight, tune.EPS)
            assert torch.equal(_bits(out), _bits(full[:t])) and torch.equal(_bits(res), _bits(full_res[:t])), (h, t)
    return doc


def test_norm_candidates_keep_shape_0s_bits_at_other_batches():
    """The probe's verdict holds beyond the probe batch: each shape it keeps gives shape 0's bits at 1 and 300
    rows of other data; shape 1 (shape 0's own kernel at hidden 1024 bf16) is kept."""
    dev = torch.device("cuda", torch.cuda.current_device())
    bench = tune.NormBench(dev, [1024], 64, torch.bfloat16, calls=2, replays=1)
    status = tune.norm_candidates(lambda s: bench.probe(s, 1024), range(_C.add_rmsnorm_configs()))
    kept = [s for s, why in status.items() if why == tune.SAME_BITS]
    assert 1 in kept
    for shape in kept:
        for rows, seed in ((1, 5), (300, 6)):
            x, residual, weight = _inputs(rows, 1024, seed)
            for got, ref in zip(_norm_once(shape, x, residual, weight), _norm_once(0, x, residual, weight)):
                assert torch.equal(_bits(got), _bits(ref)), (shape, rows)
        assert bench.time(shape, 16, 1024) > 0


def test_norm_candidates_of_another_order_stay_right_at_other_batches():
    """At hidden 8192 bf16 the 8-byte-piece shape 16 (one row a CTA, another element order) is OTHER_ORDER, and each
    OTHER_ORDER shape stays within NORM_ORDER_TOLERANCE of shape 0 (residual bitwise) at 1 and 300 rows of other
    data: the probe's verdict is what lets tokenweave-tune time it for the whole range."""
    dev = torch.device("cuda", torch.cuda.current_device())
    bench = tune.NormBench(dev, [8192], 64, torch.bfloat16, calls=2, replays=1)
    status = tune.norm_candidates(lambda s: bench.probe(s, 8192), range(_C.add_rmsnorm_configs()),
                                  lambda s: bench.row_group(s, 8192))
    assert status[16] == tune.OTHER_ORDER, status
    for shape in [s for s, why in status.items() if why == tune.OTHER_ORDER]:
        for rows, seed in ((1, 7), (300, 8)):
            x, residual, weight = _inputs(rows, 8192, seed)
            got, ref = _norm_once(shape, x, residual, weight), _norm_once(0, x, residual, weight)
            assert tune.same_but_order(got, ref), (shape, rows)


@pytest.mark.parametrize("hidden,family", ((8192, (16, 19, 20, 22, 23, 26)), (4096, (18, 21, 24, 25)), (4096, (17, 27))))
def test_norm_families_give_one_set_of_bits_at_every_batch(hidden, family):
    """The 8-byte-piece shapes that differ only in the order of their traffic (csrc/kernels/launch.cu PiecesOrder,
    registers) are one family to tokenweave-tune (norm_families), which may then switch between them by batch
    size: so they must give the same bits at any batch, not only on the probe (where the family was told apart from
    shape 0's bits: OTHER_ORDER)."""
    dev = torch.device("cuda", torch.cuda.current_device())
    bench = tune.NormBench(dev, [hidden], 64, torch.bfloat16, calls=2, replays=1)
    status = tune.norm_candidates(lambda s: bench.probe(s, hidden), range(_C.add_rmsnorm_configs()),
                                  lambda s: bench.row_group(s, hidden))
    whole = [s for s, why in status.items() if why == tune.OTHER_ORDER]
    families = tune.norm_families(lambda s: bench.probe(s, hidden), whole, lambda s: bench.row_group(s, hidden))
    assert family in families, families
    for rows, seed in ((1, 9), (129, 10), (1000, 11)):
        x, residual, weight = _inputs(rows, hidden, seed)
        first = _norm_once(family[0], x, residual, weight)
        for shape in family[1:]:
            for got, ref in zip(_norm_once(shape, x, residual, weight), first):
                assert torch.equal(_bits(got), _bits(ref)), (shape, rows)


def test_tiny_one_gpu_stages_only(user_config, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TOKENWEAVE_PDL", raising=False)
    tw.ops._ops()
    before = tw.programmatic_launch()
    tune.main(["--no-allreduce", "--hidden", "1024", "2048", "--tokens", "1", "16", "256", "--calls", "5",
               "--replays", "3", "--key", "world", "--results-dir", str(tmp_path), "--out", str(user_config)])
    assert tw.programmatic_launch() is before  # restored
    out = capsys.readouterr().out
    assert "0 dispatch" in out and "export TOKENWEAVE_CONFIG=" in out
    doc = _check_one_gpu_sections(user_config, [1024, 2048], [1, 16, 256])
    assert doc["entries"] == []
    card = tuning.device_slug(0)
    results = json.loads((tmp_path / f"tune-{card}-tp1.json").read_text())
    assert {r.get("table") for r in results["rows"]} == {"norm", "launch"}  # shape 1 is always a candidate
    assert str(tmp_path) in doc["launch"][0]["source"]


def test_tiny_tune_on_two_gpus(user_config, monkeypatch):
    monkeypatch.delenv("TOKENWEAVE_PDL", raising=False)
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
    _check_one_gpu_sections(user_config, [1024], [1, 16, 256])  # rank 0 ran them


def test_tiny_emulated_tune_on_one_gpu(user_config, capsys, monkeypatch):
    monkeypatch.delenv("TOKENWEAVE_PDL", raising=False)
    tune.main(["--emulated", "2", *TINY, "--out", str(user_config)])
    assert os.environ["TOKENWEAVE_CONFIG"] == str(user_config)  # restored after measuring without it
    assert "export TOKENWEAVE_CONFIG=" in capsys.readouterr().out
    entry = _check_entry(user_config, 2, emulated=True)
    assert entry["gpus"] == 1 and "emulated world of 2 ranks" in entry["source"]
    _check_one_gpu_sections(user_config, [1024], [1, 16, 256])
