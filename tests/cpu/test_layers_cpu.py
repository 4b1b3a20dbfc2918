"""The reference TP Llama stack in every mode, on gloo, against a single-process float64 reference.

The tokenweave mode runs the same schedule code as on GPUs (sequentially, no streams), with splits
on sequence boundaries and through a sequence (K/V carried across the split).
"""
import pytest
import torch

import tokenweave as tw
from dist_utils import run_workers
from tokenweave.models.llama import (MODES, TINY, LlamaShape, TokenLayout, TPLlamaStack, random_hidden_states,
                                     reference_forward)
from tokenweave.split import Split, time_call_us
from tokenweave.weave import WovenPass

SEED = 11
LAYERS = 2
SEQ_LENS = [5, 17, 9, 33, 1]  # 65 tokens; boundaries at 5, 22, 31, 64
SPLITS = [None, 22, 20, 40, 64, 1]  # boundary, inside seq 2, inside seq 4, before the 1-token seq, after token 0
TP4_SHAPE = LlamaShape(hidden=64, heads=8, kv_heads=4, head_dim=8, intermediate=64, rope_theta=10000.0)


def _rel(got, ref):
    return float((got.double() - ref).norm() / ref.norm())


def _all_modes(rank, world, shape, dtype):
    comm = tw.Communicator(max_tokens=128, hidden=shape.hidden, dtype=dtype)
    stack = TPLlamaStack(comm, shape, LAYERS, dtype=dtype, seed=SEED)
    x = random_hidden_states(sum(SEQ_LENS), shape.hidden, SEED, "cpu", dtype)
    x_before = x.clone()
    ref = reference_forward(shape, LAYERS, world, SEED, x, SEQ_LENS, dtype)
    errors = {}
    for mode in MODES:
        for point in SPLITS if mode == "tokenweave" else [None]:
            out = stack.forward(x, stack.plan(SEQ_LENS, point), mode)
            assert out.shape == x.shape and out.dtype == dtype
            errors[(mode, point)] = _rel(out, ref)
    assert torch.equal(x, x_before), "forward must not modify its input"
    # the attention carry is consumed within the layer: nothing leaks into the next forward
    assert all(layer._kv_carry is None for layer in stack.layers)
    comm.close()
    return errors


@pytest.mark.parametrize("world,shape", [(2, TINY), (4, TP4_SHAPE)])
def test_every_mode_matches_float64_reference(world, shape):
    per_rank = run_workers(_all_modes, world, shape, torch.float32)
    for errors in per_rank:
        for (mode, point), err in errors.items():
            if mode == "comm_removed":
                assert err > 1e-2, "without the all-reduce the result must differ (else the test proves nothing)"
            else:
                assert err < 2e-6, (mode, point, err)
    # every rank computes the same result (comm_removed excepted: each rank keeps its own partial sums)
    assert all({k: v for k, v in errors.items() if k[0] != "comm_removed"} ==
               {k: v for k, v in per_rank[0].items() if k[0] != "comm_removed"} for errors in per_rank)


def _bf16_modes(rank, world):
    comm = tw.Communicator(max_tokens=128, hidden=TINY.hidden, dtype=torch.bfloat16)
    stack = TPLlamaStack(comm, TINY, LAYERS, dtype=torch.bfloat16, seed=SEED)
    x = random_hidden_states(sum(SEQ_LENS), TINY.hidden, SEED, "cpu", torch.bfloat16)
    ref = reference_forward(TINY, LAYERS, world, SEED, x, SEQ_LENS, torch.bfloat16)
    return {mode: _rel(stack.forward(x, stack.plan(SEQ_LENS, 20), mode), ref) for mode in MODES[:3]}


def test_bf16_modes_within_bf16_tolerance():
    for errors in run_workers(_bf16_modes, 2):
        for mode, err in errors.items():
            assert err < 3e-2, (mode, err)


def _tune_and_split_on_boundaries(rank, world, cache_dir):
    import os

    os.environ["TOKENWEAVE_CACHE_DIR"] = cache_dir
    comm = tw.Communicator(max_tokens=512, hidden=TINY.hidden, dtype=torch.float32)
    stack = TPLlamaStack(comm, TINY, 1, dtype=torch.float32, seed=SEED, allow_split_inside_sequence=False)
    seq_lens = [100, 200, 212, 88]
    chosen = stack.tune(seq_lens, timer=lambda fn: time_call_us(fn, comm.device, warmup=1, iters=1))
    layout = stack.plan(seq_lens)  # "auto": from the cache just written
    # the fastest may legitimately be "no split" on CPU; if split, it lies on a sequence start
    assert layout.split == chosen
    if chosen.is_split:
        assert chosen.point in (100, 300, 512)
    x = random_hidden_states(sum(seq_lens), TINY.hidden, 3, "cpu", torch.float32)
    ref = reference_forward(TINY, 1, world, SEED, x, seq_lens, torch.float32)
    err = _rel(stack.forward(x, stack.plan(seq_lens, 300), "tokenweave"), ref)
    comm.close()
    return chosen, err, os.path.exists(os.path.join(cache_dir, "split_tuning.json"))


def test_tuner_agrees_across_ranks_and_caches(tmp_path):
    results = run_workers(_tune_and_split_on_boundaries, 2, str(tmp_path))
    assert results[0][0] == results[1][0]
    for _, err, cached in results:
        assert err < 2e-6 and cached


def test_token_layout_segments_and_carry():
    seq_lens = [5, 17, 9]
    layout = TokenLayout(seq_lens, Split(31, 12), TINY, "cpu")
    a, b = layout.segments
    assert [(s.start, s.length, s.first_position, s.continues) for s in a] == [(0, 5, 0, False), (5, 7, 0, True)]
    assert [(s.start, s.length, s.first_position, s.continues) for s in b] == [(0, 10, 7, False), (10, 9, 0, False)]
    assert [g.carried for g in layout.groups[1]] == [True, False]
    # equal-length fresh sequences attend in one batched call
    batched = TokenLayout([4, 4, 4, 2], Split(14), TINY, "cpu")
    assert [(g.start, g.count, g.length) for g in batched.groups[0]] == [(0, 3, 4), (12, 1, 2)]
    assert layout.boundaries == [5, 22]
    with pytest.raises(ValueError):
        TokenLayout(seq_lens, Split(30, 12), TINY, "cpu")


def _woven_pass_checks(rank, world):
    comm = tw.Communicator(max_tokens=64, hidden=16, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(10, 16, generator=g)
    residual = torch.randn(10, 16, generator=g)
    weight = torch.rand(16, generator=g) + 0.5
    seen = []

    def stage(part, rows):
        seen.append((part, rows.shape[0]))
        return rows * (rank + 1)

    woven = WovenPass(comm, x, residual.clone(), [(0, 4), (4, 10)])
    woven.stage(stage, weight, 1e-6)
    woven.stage(stage, weight, 1e-6)
    out = woven.finish()
    with pytest.raises(RuntimeError):
        woven.finish()
    for bad in ([(0, 4)], [(0, 4), (5, 10)], [(0, 0), (0, 10)]):
        with pytest.raises(ValueError):
            WovenPass(comm, x, residual, bad)
    comm.close()
    return seen, out


def test_woven_pass_order_and_validation():
    (seen, out0), (_, out1) = run_workers(_woven_pass_checks, 2)
    assert seen == [(0, 4), (1, 6), (0, 4), (1, 6)]  # TokenWeave order: A, B per stage
    assert torch.equal(out0, out1)


def _load_bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "e2e_layers.py"
    spec = importlib.util.spec_from_file_location("e2e_layers_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench_smoke(rank, world, out_dir, cache_dir):
    import argparse
    import os

    os.environ["TOKENWEAVE_CACHE_DIR"] = cache_dir
    bench = _load_bench()
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    bench.worker(parser.parse_args(["--tokens", "8", "300", "--layers", "1", "--seq-len", "128",
                                    "--out-dir", out_dir]))


def test_e2e_bench_pipeline_on_cpu(tmp_path):
    """The benchmark's pipeline end to end on gloo (tiny shape, wall clock): rows, schema, checks."""
    import json

    run_workers(_bench_smoke, 2, str(tmp_path / "results"), str(tmp_path / "cache"))
    doc = json.loads((tmp_path / "results" / "e2e_layers-cpu-tp2.json").read_text())
    assert {"bench", "device", "tp", "torch", "git", "rows"} <= set(doc) and doc["tp"] == 2
    variants = MODES + ("baseline_repeat",)  # the baseline timed again: the run's noise
    assert {(r["tokens"], r["variant"]) for r in doc["rows"]} == {(t, m) for t in (8, 300) for m in variants}
    assert {p["tokens"] for p in doc["noise"]["per_size"]} == {8, 300}
    for r in doc["rows"]:
        assert r["us"] > 0 and r["hidden"] and r["dtype"] == "bfloat16"
        if r["variant"] != "comm_removed":
            assert r["max_rel_diff"] < 5e-2, r


def test_e2e_bench_times_tokenweave_without_its_symmetric_rows():
    """tokenweave_private_rows: the same forward with the stack's symmetric rows off during the call, back on
    after it (also when it raises); nothing where the stack has none (the torch transport)."""
    from types import SimpleNamespace

    bench = _load_bench()
    seen = []

    def run_modes(seq_lens, *, timer, split, modes):
        seen.append((stack.rows, tuple(seq_lens), split, modes))
        if split == "boom":
            raise RuntimeError("boom")
        return {"outputs": {"tokenweave": "out"}, "us": {"tokenweave": 1.0}}

    rows = object()
    stack = SimpleNamespace(rows=rows, run_modes=run_modes)
    got = bench.run_private_rows(stack, [4, 4], None, "auto")
    assert got["us"] == {"tokenweave": 1.0} and seen == [(None, (4, 4), "auto", ("tokenweave",))]
    assert stack.rows is rows
    with pytest.raises(RuntimeError):
        bench.run_private_rows(stack, [8], None, "boom")
    assert stack.rows is rows
    stack.rows = None
    assert bench.run_private_rows(stack, [8], None, "auto") is None and len(seen) == 2


def test_stream_pair_never_uses_the_callers_stream_for_communication():
    """torch's stream pool wraps after 32: the communication stream may BE the caller's, which would serialise
    the overlap silently; keep_apart draws the pool's next one."""
    from types import SimpleNamespace

    from tokenweave.weave import StreamPair

    pool = [SimpleNamespace(cuda_stream=2000 + i) for i in range(32)]
    drawn = iter(range(10 ** 6))
    pair = StreamPair("cpu")
    pair.enabled, pair._draw = True, lambda: pool[next(drawn) % 32]
    pair.comm = pool[5]
    pair.keep_apart(pool[5])
    assert pair.comm.cuda_stream != 2005
    pair.comm = pool[6]
    pair.keep_apart(pool[5])
    assert pair.comm is pool[6]  # nothing coincides: kept


def test_woven_pass_with_symmetric_rows_shards_the_residual_where_lean_runs(monkeypatch):
    """With SymmetricRows on a (fake) device transport: every stage writes its partial sum into the symmetric buffer
    (out=), the fused op gets that buffer as x and the symmetric out rows, a part the dispatcher runs lean on gets
    the rows it owns of the residual (a view at the right offset) and sharded_residual=True, a small part (one-shot)
    the whole residual; finish returns a copy, not the reused buffer."""
    from dataclasses import replace

    from fakes import Recorder, fake_comm
    from tokenweave import ops, tuning
    from tokenweave.weave import SymmetricRows

    rec = Recorder()
    monkeypatch.setattr(ops, "_OPS", rec)
    c = fake_comm(capacity_bytes=64 << 20)  # TP4, rank 1
    c.rank = 1
    base = tuning.dispatch_config("h200", 4, 2, 8192)
    c._dispatch = lambda itemsize, hidden: replace(base, lean=True, lean_pull=True)
    rows = SymmetricRows(c, 128, 8192, torch.bfloat16)
    x = torch.randn(100, 8192).to(torch.bfloat16)
    residual = torch.randn(100, 8192).to(torch.bfloat16)
    weight = torch.ones(8192, dtype=torch.bfloat16)
    bounds = [(0, 8), (8, 100)]  # 128 KiB: one-shot (TP4 limit 512 KiB); 92 rows = 1.4 MiB: lean_pull
    seen = []

    def stage(part, xs, out=None):
        seen.append((part, out))
        return torch.mul(xs, 3, out=out) if part == 0 else xs * 2  # part 1 ignores out=

    woven = WovenPass(c, x, residual, bounds, rows=rows, sharded_residual=True)
    assert woven.sharded == [False, True]
    woven.stage(stage, weight, 1e-6)
    woven.stage(stage, weight, 1e-6)
    final = woven.finish()
    assert [p for p, _ in seen] == [0, 1, 0, 1]
    assert all(o.data_ptr() == rows.partial[a:b].data_ptr() for (p, o), (a, b) in zip(seen, bounds * 2))
    one, lean = rec.calls[0], rec.calls[1]
    assert one["algo"] == tw.comm.ALGOS["one_shot"] and one["residual"].shape == (8, 8192)
    assert lean["op"] == "lean" and lean["sharded"] and lean["algo"] == tw.comm.ALGOS["lean_pull"]
    first, n = c.shard_rows(92)  # rank 1 of 4: rows 23..45 of the part
    assert (first, n) == (23, 23)
    assert lean["residual"].data_ptr() == residual[8 + first].data_ptr() and lean["residual"].shape == (n, 8192)
    # part 1's stage ignored out=: its sum was copied into the symmetric buffer, which the op got as x
    assert lean["x"].data_ptr() == rows.partial[8].data_ptr() and lean["out"].data_ptr() == rows.out[8].data_ptr()
    assert final.data_ptr() != rows.out.data_ptr() and final.shape == (100, 8192)
    # buffers already in symmetric memory (an emulated world's, say) wrap the same way
    again = SymmetricRows.of(rows.partial, rows.out)
    assert (again.max_tokens, again.hidden, again.dtype) == (128, 8192, torch.bfloat16) and again.fits(x)
    with pytest.raises(ValueError, match="one shape and dtype"):
        SymmetricRows.of(rows.partial, rows.out[:64])
    # without rows nothing is sharded and no buffer is used
    assert WovenPass(c, x, residual, bounds, sharded_residual=True).sharded == [False, False]
