"""CPU tests of the benchmark harness and of the fused benchmark's CPU reference path."""
import json
import os
import re
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
    extra = [{"tokens": 1, "hidden": 8192, "dtype": "bfloat16", "variant": "extra", "us": 5.0},
             {"tokens": 16, "hidden": 8192, "dtype": "bfloat16", "variant": "extra", "us": None},
             {"tokens": 1, "hidden": 8192, "dtype": "bfloat16", "variant": "nowhere", "us": None, "skipped": "why"}]
    text = harness.print_table(_rows(tokens=(1, 16)) + extra)
    assert text in capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].startswith("== hidden=8192 dtype=bfloat16")
    assert "noise" not in lines[0]  # no baseline_repeat: no noise column
    assert lines[1].split() == ["tokens", "baseline", "nccl", "tokenweave", "extra"]  # "nowhere" never ran
    assert lines[2].split() == ["1", "30.0", "20.0", "(1.50x)", "10.0", "(3.00x)", "5.0", "(6.00x)"]
    assert "(3.00x)" in lines[3] and lines[3].split()[-1] == "-"


def test_table_and_json_state_the_run_to_run_noise(tmp_path):
    rows = _rows(tokens=(1, 16), times={"baseline": 30.0, "tokenweave": 10.0, "baseline_repeat": 33.0})
    rows.append({"tokens": 64, "hidden": 8192, "dtype": "bfloat16", "variant": "baseline", "us": 50.0})  # no repeat
    lines = harness.format_table(rows).splitlines()
    assert "noise = |baseline - baseline_repeat| / baseline" in lines[0]
    assert lines[1].split()[-1] == "noise"
    assert lines[2].split()[-1] == "10.0%" and lines[3].split()[-1] == "10.0%" and lines[4].split()[-1] == "-"
    noise = harness.run_to_run_noise(rows)
    assert noise["variants"] == ["baseline", "baseline_repeat"] and noise["max"] == pytest.approx(0.1)
    assert [(p["tokens"], p["hidden"], p["noise"]) for p in noise["per_size"]] == [(1, 8192, 0.1), (16, 8192, 0.1)]
    assert harness.run_to_run_noise(_rows()) is None
    json_path, _ = harness.write_results("fused", 2, rows, tmp_path, device="cpu")
    assert json.loads(json_path.read_text())["noise"] == noise
    gemm = [{"M": 512, "K": 1024, "N": 8192, "dtype": "bfloat16", "variant": v, "us": us}
            for v, us in (("sequential", 100.0), ("sequential_repeat", 98.0))]
    json_path, _ = harness.write_results("gemm", 2, gemm, tmp_path, device="cpu", x_key="M", panel_keys=("K", "N"),
                                         baseline="sequential")
    assert json.loads(json_path.read_text())["noise"]["max"] == pytest.approx(0.02)


def test_bandwidth_fields_flag_only_bandwidth_bound_sizes():
    class FakeCopy:  # 4000 GB/s on large copies, latency-bound below 1 MB of traffic
        peak_gbps = 4000.0

        def gbps(self, nbytes):
            return 4000.0 if nbytes >= 1 << 20 else 500.0

    traffic = harness.add_rmsnorm_traffic_bytes(8192, 8192, 2)
    assert traffic == (4 * 8192 + 1) * 8192 * 2
    slow = harness.bandwidth_fields(traffic / 2600e3, traffic, FakeCopy())  # 2600 GB/s: the trap's number
    assert slow["GBps"] == pytest.approx(2600, rel=1e-3) and slow["frac_of_peak_copy"] == pytest.approx(0.65)
    assert slow["bw_low"] is True and "LOW" in harness.format_bandwidth(slow)
    fast = harness.bandwidth_fields(traffic / 3900e3, traffic, FakeCopy())
    assert fast["bw_low"] is False and "LOW" not in harness.format_bandwidth(fast)
    tiny = harness.bandwidth_fields(2.0, 1024, FakeCopy())  # a few KB cannot reach the copy bandwidth: not judged
    assert tiny["bw_low"] is None and "latency-bound" in harness.format_bandwidth(tiny)
    assert harness.bandwidth_fields(None, traffic, FakeCopy()) == {}


def test_copy_bandwidth_on_cpu_counts_read_and_written_bytes():
    calls = []

    def timer(fn, calls_=None, **kwargs):
        fn()
        calls.append(kwargs)
        return 1000.0  # us

    copy = harness.CopyBandwidth(torch.device("cpu"), lambda fn, **kw: timer(fn, **kw), peak_bytes=2 << 20)
    assert copy.peak_gbps == pytest.approx((2 << 20) / 1e6)  # 2 MiB of traffic (1 MiB read + 1 written) in 1 ms
    copy.gbps(2 << 20)
    assert len(calls) == 1  # cached per size
    copy.gbps(4096)
    assert len(calls) == 2


def test_copy_bandwidth_is_the_faster_method_at_each_size():
    """Each size's bandwidth is the fastest of the copy methods (none was fastest at every size on one H200), and
    the results' description names every method with its large-copy bandwidth."""
    assert list(harness.CopyBandwidth(torch.device("cpu"), lambda fn, **kw: (fn(), 1000.0)[1],
                                      peak_bytes=2 << 20).methods) == ["copy_"]  # no SM copy without a GPU
    ran: list[tuple[str, int]] = []
    us = {"memcpy": 1000.0, "sm": 600.0}

    def method(name):
        def copy(dst, src):
            dst.copy_(src)
            ran.append((name, src.numel()))
        return copy

    def timer(fn, **kw):
        fn()
        return us[ran[-1][0]] if ran[-1][0] != "sm" or ran[-1][1] > 4096 else 2000.0  # sm slower when small

    copy = harness.CopyBandwidth(torch.device("cpu"), timer, peak_bytes=2 << 20,
                                 methods={"memcpy": method("memcpy"), "sm": method("sm")})
    assert copy.peak_by_method == {"memcpy": pytest.approx((2 << 20) / 1000e3), "sm": pytest.approx((2 << 20) / 600e3)}
    assert copy.peak_gbps == pytest.approx((2 << 20) / 600e3)
    assert ran == [("memcpy", 1 << 20), ("sm", 1 << 20)]  # each copies half the traffic (read + written counted)
    assert copy.gbps(8192) == pytest.approx(8192 / 1000e3)  # at 8 KiB of traffic memcpy is the faster
    copy.gbps(8192)
    assert len(ran) == 4  # cached per size
    d = copy.describe()
    assert d["GBps"] == round(copy.peak_gbps, 1) and set(d["by_method"]) == {"memcpy", "sm"}
    assert "memcpy, sm" in d["method"]
    assert copy.nominal_gbps is None and d["nominal_GBps"] is None  # no card: no nominal bandwidth


def test_time_wall_calls_and_resets():
    calls, resets = [], []
    us = harness.time_wall(lambda: calls.append(1), calls=4, replays=3, warmup=2,
                           before_replay=lambda: resets.append(1))
    assert us > 0 and len(calls) == 2 + 4 * 3 and len(resets) == 3


def test_where():
    if not torch.cuda.is_available():
        assert harness.device_slug() == "cpu"
    assert isinstance(harness.git_sha(), str) and harness.git_sha()
    assert harness.result_stem("fused", 8, "h200") == "fused-h200-tp8"


def test_reference_norm_matches_tokenweave_add_rmsnorm():
    import tokenweave as tw

    g = torch.Generator().manual_seed(0)
    x, res, w = (torch.randn(4, 64, generator=g).to(torch.bfloat16) for _ in range(3))
    res_ref, res_tw = res.clone(), res.clone()
    out_ref = fused.baseline_add_rmsnorm(x, res_ref, w[0], fused.EPS)
    out_tw = tw.add_rmsnorm(x, res_tw, w[0], fused.EPS)
    assert torch.equal(res_ref, res_tw)
    torch.testing.assert_close(out_ref, out_tw)


def _run(cmd, cwd, timeout=180):
    env = _cpu_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def test_fused_bench_script_cpu_two_gloo_processes_default_out_dir(tmp_path):
    """The bench script end to end on CPU: default results folder (not bench/results), exact columns, noise,
    the baseline norm's bandwidth, correctness, and the targets step saying it did not judge a CPU run."""
    out = _run([sys.executable, str(ROOT / "bench" / "fused_allreduce_rmsnorm.py"), "--tp", "2", "--tokens", "1", "8",
                "--hidden", "64", "--calls", "2", "--replays", "2"], cwd=tmp_path)
    results = tmp_path / harness.DEFAULT_OUT_DIR
    assert f"results go to {results}" in out
    assert "NOT a GPU measurement" in out
    assert "== hidden=64 dtype=bfloat16" in out and "noise = |baseline - baseline_repeat| / baseline" in out
    assert "baseline norm bandwidth" in out
    assert "targets: not evaluated (CPU smoke run" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == [harness.DEFAULT_OUT_DIR]  # nothing else written
    doc = json.loads((results / "fused_allreduce_rmsnorm-cpu-tp2.json").read_text())
    assert doc["device"] == "cpu" and doc["tp"] == 2 and doc["transport"] == "torch" and "targets" not in doc
    ran = {(r["tokens"], r["variant"]): r for r in doc["rows"] if r["us"] is not None}
    assert {v for _, v in ran} == {"baseline", "norm", "nccl", "tokenweave", "tokenweave_symm", "baseline_repeat"}
    assert [r["variant"] for r in doc["rows"] if r["tokens"] == 1][-1] == "baseline_repeat"  # timed last
    for t in (1, 8):
        for v in ("tokenweave", "tokenweave_symm"):  # tokenweave_symm: out and residual from comm.empty
            assert ran[(t, v)]["ok"] and 0 <= ran[(t, v)]["max_err"] < fused.ATOL
        assert all(r["us"] > 0 for (tt, _), r in ran.items() if tt == t)
        assert {"GBps", "frac_of_peak_copy", "copy_GBps_same_bytes", "bw_low"} <= set(ran[(t, "norm")])
    assert {p["tokens"] for p in doc["noise"]["per_size"]} == {1, 8}
    assert doc["copy_bandwidth"]["GBps"] > 0
    assert "alone" in doc["variants"]["symm_two_shot"] and "RMSNorm" in doc["variants"]["symm_two_shot+norm"]
    skipped = [r for r in doc["rows"] if r["us"] is None]
    assert skipped and all(r.get("skipped") for r in skipped)


def test_fused_bench_world_size_one(tmp_path):
    """TP1: the baseline is the norm alone, tokenweave runs and matches, collective variants skip with a reason."""
    out = _run([sys.executable, "-m", "tokenweave.bench", "--tp", "1", "--tokens", "1", "8", "--hidden", "64",
                "--calls", "2", "--replays", "2", "--out-dir", str(tmp_path)], cwd=tmp_path)
    assert "world size 1: baseline = the add+RMSNorm alone" in out
    doc = json.loads((tmp_path / "fused_allreduce_rmsnorm-cpu-tp1.json").read_text())
    assert doc["tp"] == 1
    rows = {(r["tokens"], r["variant"]): r for r in doc["rows"]}
    for t in (1, 8):
        assert rows[(t, "baseline")]["us"] > 0 and rows[(t, "baseline_repeat")]["us"] > 0
        assert rows[(t, "tokenweave")]["us"] > 0 and rows[(t, "tokenweave")]["ok"]
        for v in fused.MULTI_RANK_VARIANTS:
            assert rows[(t, v)]["us"] is None and "more than one rank" in rows[(t, v)]["skipped"]
        assert "world size 1" in rows[(t, "tokenweave_one_shot")]["skipped"]
    header = next(line for line in out.splitlines() if line.lstrip().startswith("tokens"))
    assert "nccl" not in header.split() and "tokenweave" in header.split()  # no all-skipped columns


def test_thin_script_help():
    env = _cpu_env()
    env.pop("PYTHONPATH", None)  # the script must find the package from a source checkout by itself
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "fused_allreduce_rmsnorm.py"), "--help"],
                         cwd=ROOT / "bench", env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "--quick" in res.stdout and "--variants" in res.stdout
    text = re.sub(r"-\s+", "-", " ".join(res.stdout.split()))  # undo argparse's line wrapping
    assert f"--out-dir OUT_DIR folder for the results files (default: ./{harness.DEFAULT_OUT_DIR}" in text
    assert "symm_two_shot+norm" in res.stdout and "baseline_repeat" in res.stdout


class _RecordingBackend:
    """A torch.compile backend that keeps each graph's placeholder example values and runs the graph eagerly."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append([n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"])
        return gm.forward

    @staticmethod
    def symbolic(graph) -> bool:
        """True when any input is a SymInt or any tensor input has a symbolic size."""
        return any(isinstance(v, torch.SymInt)
                   or (isinstance(v, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in v.shape))
                   for v in graph)


def _norm_inputs(tokens, hidden, seed):
    g = torch.Generator().manual_seed(seed)
    x, res = (torch.randn(tokens, hidden, generator=g) for _ in range(2))
    return x, res, 1 + 0.1 * torch.randn(hidden, generator=g)


def test_compiled_norm_trap_reproduced_and_static_compiled_avoids_it():
    """One torch.compile over hidden 64 then 128 ends in symbolic-shape graphs (hidden included); StaticCompiled
    gives exactly one static graph and one cache entry per shape, even after that trap ran on the same function."""
    torch._dynamo.reset()
    shapes = [(t, h) for h in (64, 128) for t in (1, 2)]
    try:
        trap = _RecordingBackend()
        plain = torch.compile(fused.baseline_add_rmsnorm, fullgraph=True, backend=trap)
        for t, h in shapes:
            plain(*_norm_inputs(t, h, 0), fused.EPS)
        assert not trap.symbolic(trap.graphs[0])
        weights = [g[-1] for g in trap.graphs if isinstance(g[-1], torch.Tensor) and g[-1].dim() == 1]
        assert any(isinstance(w.shape[0], torch.SymInt) for w in weights), "hidden 128 should have gone symbolic"

        static = _RecordingBackend()
        norm = harness.StaticCompiled(fused.baseline_add_rmsnorm, backend=static)
        for rep in range(2):  # the second pass must hit the cache: no new graph
            for t, h in shapes:
                x, res, w = _norm_inputs(t, h, t + h)
                res_ref = res.clone()
                out = norm(x, res, w, fused.EPS)
                torch.testing.assert_close(out, fused.baseline_add_rmsnorm(x, res_ref, w, fused.EPS), rtol=0, atol=0)
                torch.testing.assert_close(res, res_ref, rtol=0, atol=0)
        assert len(static.graphs) == len(shapes)
        assert not any(static.symbolic(g) for g in static.graphs)
        assert [tuple(g[0].shape) for g in static.graphs] == shapes
        entries = norm.cache_entries()
        assert len(entries) == len(shapes) and set(entries.values()) == {1}
        assert norm.summary()["signatures"] == len(shapes)
        assert norm.summary()["max_cache_entries_per_signature"] == 1
    finally:
        torch._dynamo.reset()


def test_static_compiled_signature_and_input_check():
    x = torch.zeros(2, 8, dtype=torch.bfloat16)
    assert harness.StaticCompiled.signature(x, 1e-6) == (("tensor", (2, 8), torch.bfloat16, "cpu"), 1e-6)
    assert harness.StaticCompiled.signature(x, eps=1e-6) != harness.StaticCompiled.signature(x, eps=1e-5)
    with pytest.raises(TypeError, match="plain Python function"):
        harness.StaticCompiled(torch.add)
