"""CPU smoke test of bench/add_rmsnorm.py (the one-GPU add+RMSNorm benchmark): it runs, says it is not a
measurement, checks tokenweave against the baseline and writes the results where it was told."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_add_rmsnorm_bench_cpu_smoke(tmp_path):
    env = dict(os.environ)  # a child starts from a copy of our environment
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path even where GPUs exist
    env.pop("PYTHONPATH", None)  # the script finds the package from a source checkout by itself
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "add_rmsnorm.py"), "--tokens", "1", "5",
                          "--hidden", "64", "--calls", "2", "--replays", "3"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "NOT a measurement" in res.stdout
    assert "tokenweave matched at every size" in res.stdout
    assert "noise = |baseline - baseline_repeat| / baseline" in res.stdout
    path = tmp_path / "tokenweave-results" / "add_rmsnorm-cpu-tp1.json"
    assert f"wrote {path}" in res.stdout
    doc = json.loads(path.read_text())
    assert (doc["bench"], doc["device"], doc["tp"], doc["measurement"]) == ("add_rmsnorm", "cpu", 1, False)
    assert {"torch", "git", "copy_bandwidth", "noise", "baseline_compile", "timing"} <= set(doc)
    rows = {(r["tokens"], r["variant"]): r for r in doc["rows"]}
    assert set(rows) == {(t, v) for t in (1, 5) for v in ("baseline", "tokenweave", "baseline_repeat")}
    for (t, v), r in rows.items():
        assert r["us"] > 0 and r["hidden"] == 64 and r["bytes"] == (4 * t + 1) * 64 * 2
        assert r["GBps"] >= 0 and r["frac_of_peak_copy"] >= 0 and "bw_low" in r
    for t in (1, 5):
        assert rows[(t, "tokenweave")]["ok"] and rows[(t, "tokenweave")]["max_err"] < 0.0625
    assert {p["tokens"] for p in doc["noise"]["per_size"]} == {1, 5}
