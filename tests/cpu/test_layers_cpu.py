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
