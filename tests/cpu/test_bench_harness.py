"""CPU tests of the benchmark harness and of the fused benchmark's CPU reference path."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokenweave.bench import fused, harness

ROOT = Path(__file__).resolve().parents[2]


def _rows(tokens=(1, 16, 128), hidden=8192, times=None):
    times = times or {"baseline": 30.0, "nccl": 20.0, "tokenweave": 10.0}
    return [{"tokens": t, "hidden": hidden, "dtype": "bfloat16", "variant": v, "us": us * (1 + i)}
            for i, t in enumerate(tokens) for v, us in times.items()]


def _cpu_env():
    env = dict(os.environ)  # a child starts from a copy of our environment
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path even where GPUs exist
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def test_write_results_schema(tmp_path):
    rows = _rows()
    json_path, png_path = harness.write_results("fused", 2, rows, tmp_path, extra={"targets": []}, device="cpu")
    assert json_path == tmp_path / "fused-cpu-tp2.json"
    doc = json.loads(json_path.read_text())
    assert {"bench", "device", "tp", "torch", "git", "rows", "targets"} <= set(doc)
    assert (doc["bench"], doc["device"], doc["tp"], doc["torch"]) == ("fused", "cpu", 2, torch.__version__)
    assert doc["rows"] == rows
    pytest.importorskip("matplotlib")
    assert png_path == tmp_path / "fused-cpu-tp2.png" and png_path.stat().st_size > 0


def test_write_results_rejects_extra_that_replaces_fixed_keys(tmp_path):
    with pytest.raises(ValueError, match="rows"):
        harness.write_results("fused", 2, _rows(), tmp_path, extra={"rows": []}, device="cpu")


def test_write_results_other_axes(tmp_path):
    rows = [{"M": m, "K": 2048, "N": 8192, "dtype": "bfloat16", "variant": v, "us": float(m + i)}
            for m in (512, 1024) for i, v in enumerate(("baseline", "overlap"))]
    json_path, _ = harness.write_results("gemm", 4, rows, tmp_path, device="h100", x_key="M", panel_keys=("K", "N"))
    assert json_path.name == "gemm-h100-tp4.json"
    assert "K=2048 N=8192" in harness.format_table(rows, x_key="M", panel_keys=("K", "N"))
    png = json_path.with_suffix(".png")
    png.unlink(missing_ok=True)
    pytest.importorskip("matplotlib")
    assert harness.replot(json_path) == png and png.stat().st_size > 0  # redrawn from the JSON alone


def test_print_table_speedups_and_missing_cells(capsys):
    rows = _rows(tokens=(1, 16)) + [{"tokens": 16, "hidden": 8192, "dtype": "bfloat16", "variant": "extra", "us": None}]
    text = harness.print_table(rows)
    assert text in capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].startswith("== hidden=8192 dtype=bfloat16")
    assert lines[1].split() == ["tokens", "baseline", "nccl", "tokenweave", "extra"]
    assert lines[2].split() == ["1", "30.0", "20.0", "(1.50x)", "10.0", "(3.00x)", "-"]
    assert "(3.00x)" in lines[3] and lines[3].split()[-1] == "-"


def test_time_wall_calls_and_resets():
    calls, resets = [], []
    us = harness.time_wall(lambda: calls.append(1), calls=4, replays=3, warmup=2,
                           before_replay=lambda: resets.append(1))
    assert us > 0 and len(calls) == 2 + 4 * 3 and len(resets) == 3


def test_where():
    if not torch.cuda.is_available():
        assert harness.device_name() == "cpu"
    assert isinstance(harness.git_sha(), str) and harness.git_sha()
    assert harness.result_stem("fused", 8, "h200") == "fused-h200-tp8"


def test_targets_pass_miss_and_not_measured():
    times = {"baseline": 30.0, "symm_two_shot": 12.0, "tokenweave": 10.0}
    rows = _rows(tokens=(1, 16, 128, 1024, 4096), times=times)
    targets = {t["name"].split(" (")[0]: t for t in fused.check_targets(rows, tp=4)}
    assert targets["tokenweave >= 2.5x baseline at T <= 16"]["status"] == "PASS"
    assert targets["tokenweave >= 2.5x baseline at T <= 16"]["values"] == {"1": 3.0, "16": 3.0}
    assert targets["tokenweave faster than symm_two_shot at every T"]["status"] == "PASS"
    assert targets["best of ctas <= 16 within 90% of best tokenweave at T >= 1024"]["status"] == "N/A"
    assert all(t["binding"] for t in targets.values())

    slow = [dict(r, us=r["us"] * 3) if r["variant"] == "tokenweave" and r["tokens"] == 128 else r for r in rows]
    ctas = [{"tokens": 1024, "hidden": 8192, "dtype": "bfloat16", "variant": f"tokenweave_ctas{n}", "us": us}
            for n, us in ((8, 50.0), (16, 40.0), (32, 30.0))]
    targets = {t["name"].split(" (")[0]: t for t in fused.check_targets(slow + ctas, tp=2)}
    assert targets["tokenweave >= 2.0x baseline at T = 128"]["status"] == "MISS"
    assert targets["tokenweave faster than symm_two_shot at every T"]["status"] == "MISS"
    assert targets["best of ctas <= 16 within 90% of best tokenweave at T >= 1024"]["values"] == {"1024": 0.75}
    assert not any(t["binding"] for t in targets.values())
    assert "informational at TP2" in fused.format_targets(list(targets.values()), tp=2)


def test_reference_norm_matches_tokenweave_add_rmsnorm():
    import tokenweave as tw

    g = torch.Generator().manual_seed(0)
    x, res, w = (torch.randn(4, 64, generator=g).to(torch.bfloat16) for _ in range(3))
    res_ref, res_tw = res.clone(), res.clone()
    out_ref = fused.add_rmsnorm_reference(x, res_ref, w[0], fused.EPS)
    out_tw = tw.add_rmsnorm(x, res_tw, w[0], fused.EPS)
    assert torch.equal(res_ref, res_tw)
    torch.testing.assert_close(out_ref, out_tw)


def test_fused_bench_cpu_fallback_two_gloo_processes(tmp_path):
    cmd = [sys.executable, "-m", "tokenweave.bench", "fused_allreduce_rmsnorm", "--tp", "2", "--tokens", "1", "8", "--hidden", "64",
           "--calls", "2", "--replays", "2", "--out-dir", str(tmp_path)]
    env = _cpu_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "NOT a GPU measurement" in res.stdout
    assert "== hidden=64 dtype=bfloat16" in res.stdout
    doc = json.loads((tmp_path / "fused_allreduce_rmsnorm-cpu-tp2.json").read_text())
    assert doc["device"] == "cpu" and doc["tp"] == 2 and doc["transport"] == "torch"
    ran = {(r["tokens"], r["variant"]): r for r in doc["rows"] if r["us"] is not None}
    assert {v for _, v in ran} == {"baseline", "norm", "nccl", "tokenweave"}
    for t in (1, 8):
        row = ran[(t, "tokenweave")]
        assert row["ok"] and 0 <= row["max_err"] < fused.ATOL
        assert all(r["us"] > 0 for (tt, _), r in ran.items() if tt == t)
    skipped = [r for r in doc["rows"] if r["us"] is None]
    assert skipped and all(r.get("skipped") for r in skipped)


def test_thin_script_help():
    env = _cpu_env()
    env.pop("PYTHONPATH", None)  # the script must find the package from a source checkout by itself
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "fused_allreduce_rmsnorm.py"), "--help"],
                         cwd=ROOT / "bench", env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "--quick" in res.stdout and "--variants" in res.stdout
