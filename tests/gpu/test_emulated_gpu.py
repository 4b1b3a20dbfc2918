"""Every algorithm's protocol in the emulated world: W ranks on one GPU (tokenweave.testing).

Float64 references on fresh random data, outputs poisoned with NaN first (every element must be written),
bitwise equality across ranks, CUDA-graph replays (Lamport buffer rotation), timeouts and mismatches.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import tokenweave as tw
from tokenweave.errors import CollectiveMismatchError, CollectiveTimeoutError

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("experimental_lean_bulk")]  # lean_bulk too

if not (torch.cuda.is_available() and tw.HAS_EXTENSION):
    pytest.skip("needs a CUDA GPU and the tokenweave extension", allow_module_level=True)

from tokenweave.testing import EmulatedWorld  # noqa: E402

EPS = 1e-5
TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-5}
ALGOS = ("one_shot", "two_shot", "lamport", "lean", "lean_sharded", "lamport_two_shot", "lamport_two_shot_sharded",
         "lean_bulk", "lean_bulk_sharded", "lean_pull", "lean_pull_sharded")
SHAPES = ((1, 4096), (3, 1032), (37, 2056), (300, 8192))


def _inputs(world, tokens, hidden, dtype, gen):
    W = world.world_size
    dev = world.device
    xs = [torch.randn(tokens, hidden, generator=gen, device=dev).to(dtype) for _ in range(W)]
    residual = torch.randn(tokens, hidden, generator=gen, device=dev).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen, device=dev)).to(dtype)
    return xs, residual, weight


def _reference(xs, residual, weight):
    z = torch.stack([x.double() for x in xs]).sum(0) + residual.double()
    out = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + EPS) * weight.double()
    return z, out


def _symmetric_copies(world, tensors):
    """``tensors`` (one per rank) copied into one symmetric tensor per rank (``world.empty``)."""
    sym = world.empty(*tensors[0].shape, dtype=tensors[0].dtype)
    for s, t in zip(sym, tensors):
        s.copy_(t)
    return sym


def _call(world, algo, xs, residual, weight, **kw):
    """One fused call on every rank; returns (outs, residuals as full [tokens, hidden] per rank).
    ``<algo>_sharded``: ``algo`` with a sharded residual. lean_pull reads x in place: x is copied into symmetric
    memory first."""
    W, (tokens, hidden), dtype = world.world_size, xs[0].shape, xs[0].dtype
    lean = algo.startswith("lean")
    sharded = algo.endswith("_sharded")
    algo = algo.removesuffix("_sharded")
    if algo == "lean_pull":
        xs = _symmetric_copies(world, xs)
    outs = world.empty(tokens, hidden, dtype=dtype) if lean else [torch.empty_like(residual) for _ in range(W)]
    if sharded:
        shards = [world.ranks[r].shard_rows(tokens) for r in range(W)]
        res = [residual[a:a + n].clone() for a, n in shards]
    elif lean:
        res = world.empty(tokens, hidden, dtype=dtype)
        for r in res:
            r.copy_(residual)
    else:
        res = [residual.clone() for _ in range(W)]
    for o in outs:
        o.fill_(float("nan"))
    world.run(lambda comm, r: tw.fused_allreduce_rmsnorm(comm, xs[r], res[r], weight, EPS, out=outs[r],
                                                         algo=algo, sharded_residual=sharded, **kw))
    world.synchronize()
    if sharded:
        res = [torch.cat(res)] * W  # the shards together are the whole residual
    return outs, res


@pytest.fixture(scope="module", params=(2, 4, 8), ids=lambda w: f"W{w}")
def world(request):
    w = EmulatedWorld(request.param, max_tokens=512, hidden=8192, dtype=torch.float32, timeout_ms=5000)
    yield w
    w.close()


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32), ids=str)
@pytest.mark.parametrize("tokens,hidden", SHAPES)
def test_matches_float64_and_ranks_agree(world, algo, dtype, tokens, hidden):
    if algo.startswith("lamport") and dtype == torch.float32:
        pytest.skip("lamport takes 2-byte dtypes")
    if algo == "lamport" and tokens * hidden * 2 > 2 << 20:
        pytest.skip("lamport takes at most 2 MiB")
    if algo.startswith("lamport_two_shot") and -(-tokens // world.world_size) * hidden * 2 > 2 << 20:
        pytest.skip("lamport_two_shot takes at most 2 MiB per rank's shard")
    if algo == "one_shot" and tokens * hidden * dtype.itemsize > world.ranks[0]._layout["one_shot_bytes"]:
        pytest.skip("one-shot limit")
    gen = torch.Generator(world.device).manual_seed(hash((world.world_size, algo, str(dtype), tokens, hidden)) % 2**31)
    xs, residual, weight = _inputs(world, tokens, hidden, dtype, gen)
    outs, res = _call(world, algo, xs, residual, weight)
    z_ref, out_ref = _reference(xs, residual, weight)
    for r in range(world.world_size):
        assert torch.isfinite(outs[r]).all(), f"rank {r}: unwritten (NaN) output elements"
        assert torch.equal(outs[r], outs[0]), f"rank {r}: out differs from rank 0 (must be bitwise identical)"
        assert torch.equal(res[r], res[0])
    tol = TOL[dtype]
    torch.testing.assert_close(res[0].double(), z_ref, rtol=tol, atol=tol * 4)
    torch.testing.assert_close(outs[0].double(), out_ref, rtol=tol, atol=tol * 4)


@pytest.mark.parametrize("algo", ("one_shot", "two_shot", "lean", "lean_sharded", "lamport_two_shot",
                                  "lamport_two_shot_sharded", "lean_bulk", "lean_bulk_sharded", "lean_pull",
                                  "lean_pull_sharded"))
def test_same_values_as_lamport(algo):
    """Every algorithm computes the same bits (Lamport: up to the sign of an exact zero)."""
    with EmulatedWorld(4, max_tokens=64, hidden=4096, timeout_ms=5000) as world:
        gen = torch.Generator(world.device).manual_seed(7)
        xs, residual, weight = _inputs(world, 16, 4096, torch.bfloat16, gen)
        ref_out, ref_res = _call(world, "lamport", xs, residual, weight)
        outs, res = _call(world, algo, xs, residual, weight)
        assert torch.equal(outs[0], ref_out[0]) and torch.equal(res[0], ref_res[0])


@pytest.mark.parametrize("algo", ("lamport_two_shot", "lamport_two_shot_sharded"))
@pytest.mark.parametrize("W", (2, 4, 8))
def test_lamport_two_shot_signed_zeros_equal_two_shot_up_to_their_sign(algo, W):
    """-0.0 in x and the residual (the sentinel's bit pattern: must be canonicalised, never hang) and sums that are
    exactly zero: the flagged two-shot's bits, but for the sign of exact zeros; bitwise equal across ranks."""
    T, H = 37, 2056
    with EmulatedWorld(W, max_tokens=64, hidden=H, timeout_ms=5000) as world:
        gen = torch.Generator(world.device).manual_seed(13 + W)
        xs, residual, weight = _inputs(world, T, H, torch.bfloat16, gen)
        xs[0][:, :64] = -0.0
        for x in xs:
            x[:5] = -0.0  # whole rows of -0.0: z = residual
        xs[1][5:9] = -xs[0][5:9]
        for x in xs[2:]:
            x[5:9] = -0.0  # rows 5..8 sum to exactly zero
        residual[:, :16] = -0.0
        residual[5:7] = -0.0  # z = -0.0 (flagged) / +0.0 (Lamport) on these rows
        ref_out, ref_res = _call(world, "two_shot", xs, residual, weight)
        outs, res = _call(world, algo, xs, residual, weight)
        for r in range(W):
            assert torch.equal(outs[r].view(torch.int16), outs[0].view(torch.int16)), f"rank {r} differs bitwise"
            assert torch.equal(res[r].view(torch.int16), res[0].view(torch.int16))
        for got, want in ((outs[0], ref_out[0]), (res[0], ref_res[0])):
            assert torch.equal(got, want)  # as values (-0.0 == +0.0)
            differ = got.view(torch.int16) != want.view(torch.int16)
            assert (got[differ] == 0).all(), "bits may differ only in the sign of an exact zero"
        assert (res[0][5:7] == 0).all() and not torch.signbit(res[0][5:7].float()).any(), "z = 0 is +0.0 (canonical)"


def test_lamport_buffers_rotate_over_1000_graph_replays():
    """Lamport calls of both kinds (one-shot, two-shot: they share the 3 buffers and the sequence) interleaved
    with a flagged one, captured once, replayed 1000 times on fresh data; uneven shards (37 rows over 4 ranks)."""
    W, T, H = 4, 37, 4096
    with EmulatedWorld(W, max_tokens=64, hidden=H, timeout_ms=5000) as world:
        gen = torch.Generator(world.device).manual_seed(11)
        xs, residual0, weight = _inputs(world, T, H, torch.bfloat16, gen)
        # 4 Lamport calls per replay: the buffer each call uses shifts by one every replay, so each kind meets
        # every buffer after each kind
        algos = ("lamport", "two_shot", "lamport_two_shot", "lamport", "lamport_two_shot")
        res = [[residual0.clone() for _ in range(W)] for _ in algos]
        outs = [[torch.empty_like(residual0) for _ in range(W)] for _ in algos]

        def step(comm, r):
            for k, algo in enumerate(algos):
                tw.fused_allreduce_rmsnorm(comm, xs[r], res[k][r], weight, EPS, out=outs[k][r], algo=algo)

        world.run(step)  # warm-up outside the graph
        world.synchronize()
        graph = world.capture(step)  # one graph per rank, as on W GPUs
        for i in range(1000):
            bres = torch.randn(T, H, generator=gen, device=world.device).to(torch.bfloat16)  # fresh every replay
            for r in range(W):
                xs[r].copy_(torch.randn(T, H, generator=gen, device=world.device))
                for k in range(len(algos)):
                    res[k][r].copy_(bres)
                    outs[k][r].fill_(float("nan"))
            graph.replay()
            if i % 97 == 0 or i == 999:
                world.synchronize()
                z_ref, out_ref = _reference(xs, bres, weight)
                for k in range(len(algos)):
                    for r in range(W):
                        assert torch.equal(outs[k][r], outs[0][0]), f"replay {i}, call {k}, rank {r} differs"
                    torch.testing.assert_close(outs[k][0].double(), out_ref, rtol=2e-2, atol=8e-2)
                    torch.testing.assert_close(res[k][0].double(), z_ref, rtol=2e-2, atol=8e-2)
        world.synchronize()


@pytest.mark.parametrize("algo", ("one_shot", "two_shot", "lamport", "lean", "lamport_two_shot", "lean_bulk",
                                  "lean_pull"))
def test_rank_that_never_launches_times_out(algo):
    W = 4
    with EmulatedWorld(W, max_tokens=64, hidden=4096, timeout_ms=300) as world:
        gen = torch.Generator(world.device).manual_seed(3)
        xs, residual, weight = _inputs(world, 8, 4096, torch.bfloat16, gen)
        xs = _symmetric_copies(world, xs)  # lean_pull reads x in place (the others take it anywhere)
        outs = world.empty(8, 4096, dtype=torch.bfloat16)
        res = world.empty(8, 4096, dtype=torch.bfloat16)  # symmetric: lean writes every rank's residual
        for r in res:
            r.copy_(residual)
        world.run(lambda comm, r: tw.fused_allreduce_rmsnorm(comm, xs[r], res[r], weight, EPS, out=outs[r], algo=algo),
                  ranks=range(W - 1))
        torch.cuda.synchronize()
        for r in range(W - 1):
            with pytest.raises(CollectiveTimeoutError) as e:
                world.ranks[r].check()
            assert e.value.rank == r
            assert torch.isnan(outs[r].float()).any(), "a call that gave up must leave NaN, not plausible output"
        assert any(world.ranks[r]._error.peer == W - 1 for r in range(W - 1))
        with pytest.raises(CollectiveTimeoutError) as e:  # the world's report: every rank's record, in order
            world.synchronize()
        report = str(e.value).split("every rank:\n", 1)[1].splitlines()[:W]
        assert [line.split(":")[0] for line in report] == [f"rank {r}" for r in range(W)]
        assert report[W - 1].startswith(f"rank {W - 1}: no error") and "waited for rank" in report[0]


@pytest.mark.parametrize("algo", ("two_shot", "lamport", "lean", "lamport_two_shot", "lean_bulk", "lean_pull"))
def test_ranks_making_different_calls_fail_as_mismatch(algo):
    """Rank 0 calls with 8 tokens, rank 1 with 4: an error on both, a mismatch on at least one; no hang."""
    W, tokens = 2, (8, 4)
    with EmulatedWorld(W, max_tokens=64, hidden=4096, timeout_ms=2000) as world:
        gen = torch.Generator(world.device).manual_seed(5)
        xs, residual, weight = _inputs(world, 8, 4096, torch.bfloat16, gen)
        xs = _symmetric_copies(world, xs)
        outs = world.empty(8, 4096, dtype=torch.bfloat16)
        res = world.empty(8, 4096, dtype=torch.bfloat16)
        for r in res:
            r.copy_(residual)
        world.run(lambda comm, r: tw.fused_allreduce_rmsnorm(comm, xs[r][:tokens[r]], res[r][:tokens[r]], weight, EPS,
                                                             out=outs[r][:tokens[r]], algo=algo))
        torch.cuda.synchronize()
        errors = []
        for comm in world.ranks:
            with pytest.raises((CollectiveMismatchError, CollectiveTimeoutError)) as e:
                comm.check()
            errors.append(e.value)
        assert any(isinstance(e, CollectiveMismatchError) for e in errors), errors


def test_lean_needs_symmetric_out():
    with EmulatedWorld(2, max_tokens=64, hidden=4096) as world:
        x = torch.randn(8, 4096, device=world.device, dtype=torch.bfloat16)
        w = torch.ones(4096, device=world.device, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="comm.empty"):
            tw.fused_allreduce_rmsnorm(world.ranks[0], x, None, w, out=torch.empty_like(x), algo="lean")


def test_lean_pull_needs_symmetric_x():
    with EmulatedWorld(2, max_tokens=64, hidden=4096) as world:
        x = torch.randn(8, 4096, device=world.device, dtype=torch.bfloat16)
        w = torch.ones(4096, device=world.device, dtype=torch.bfloat16)
        outs = world.empty(8, 4096, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="lean_pull.*comm.empty"):
            tw.fused_allreduce_rmsnorm(world.ranks[0], x, None, w, out=outs[0], algo="lean_pull")


@pytest.mark.parametrize("W", (2, 4))
def test_lean_pull_in_place_and_over_graph_replays(W):
    """out = x (in place: each row of every rank's x is read, then written, by its owner alone), a replicated
    residual, uneven shards, 50 CUDA-graph replays on fresh data: float64 reference, bitwise across ranks."""
    T, H = 37, 2056
    with EmulatedWorld(W, max_tokens=64, hidden=H, timeout_ms=5000) as world:
        gen = torch.Generator(world.device).manual_seed(17 + W)
        xs0, residual, weight = _inputs(world, T, H, torch.bfloat16, gen)
        xs, res = world.empty(T, H, dtype=torch.bfloat16), world.empty(T, H, dtype=torch.bfloat16)

        def step(comm, r):
            tw.fused_allreduce_rmsnorm(comm, xs[r], res[r], weight, EPS, out=xs[r], algo="lean_pull")

        def refill():
            fresh = [torch.randn(T, H, generator=gen, device=world.device).to(torch.bfloat16) for _ in range(W)]
            bres = torch.randn(T, H, generator=gen, device=world.device).to(torch.bfloat16)
            for r in range(W):
                xs[r].copy_(fresh[r])
                res[r].copy_(bres)
            return fresh, bres

        refill()
        world.run(step)
        world.synchronize()
        graph = world.capture(step)
        for i in range(50):
            fresh, bres = refill()
            graph.replay()
            world.synchronize()
            z_ref, out_ref = _reference(fresh, bres, weight)
            for r in range(W):
                assert torch.equal(xs[r], xs[0]) and torch.equal(res[r], res[0]), f"replay {i}: rank {r} differs"
            torch.testing.assert_close(xs[0].double(), out_ref, rtol=2e-2, atol=8e-2)
            torch.testing.assert_close(res[0].double(), z_ref, rtol=2e-2, atol=8e-2)


def test_dispatcher_picks_lean_pull_only_where_the_config_says_and_x_is_symmetric(tmp_path, monkeypatch):
    from tokenweave import tuning
    from tokenweave.comm import ALGOS

    cfg = tmp_path / "mine.json"
    cfg.write_text('{"entries": [{"world_size": 2, "one_shot_max_bytes": 0, "lean": true, "lean_pull": true, '
                   '"source": "test"}, {"world_size": 4, "one_shot_max_bytes": 0, "lean": true, "lean_pull": false, '
                   '"source": "test"}]}')
    monkeypatch.setenv("TOKENWEAVE_CONFIG", str(cfg))
    tuning._all_entries.cache_clear()
    try:
        for W, want in ((2, "lean_pull"), (4, "lean")):
            with EmulatedWorld(W, max_tokens=64, hidden=4096) as world:
                comm = world.ranks[0]
                assert comm.plan(64, 4096, 2, lean_ok=True, pull_ok=True).algo == ALGOS[want]
                assert comm.plan(64, 4096, 2, lean_ok=True, pull_ok=False).algo == ALGOS["lean"]
    finally:
        tuning._all_entries.cache_clear()


@pytest.mark.parametrize("W", (2, 4))
def test_tracked_feed_takes_the_plans_chunk_rows(W):
    """The tracked kernel (track-and-trigger's SM consumer) runs the geometry the trigger plan hands it
    (``chunk_rows``, never re-derived in C++): same bits as the resident two-shot with that geometry, float64
    reference, bitwise across ranks; ``chunk_rows=0`` is refused before launch."""
    from tokenweave import _abi
    from tokenweave._ext import _C

    T, H, dtype, ctas = 300, 2056, torch.bfloat16, 4
    ops = torch.ops.tokenweave
    with EmulatedWorld(W, max_tokens=512, hidden=H, dtype=dtype, timeout_ms=5000) as world:
        gen = torch.Generator(world.device).manual_seed(W)
        xs, residual, weight = _inputs(world, T, H, dtype, gen)
        two_shot = _abi.ALGO_CODES["two_shot"]
        geo = _C.plan(world.ranks[0]._id, T, H, _abi.dtype_code(dtype), two_shot, ctas, 2)
        chunk_rows, n_chunks = int(geo["chunk_rows"]), int(geo["n_chunks"])
        ready = [torch.zeros(_abi.MAX_CHUNKS, dtype=torch.int32, device=world.device) for _ in range(W)]
        consumed = [torch.zeros(_abi.MAX_CHUNKS, dtype=torch.int32, device=world.device) for _ in range(W)]
        outs = [torch.full_like(residual, float("nan")) for _ in range(W)]
        res = [residual.clone() for _ in range(W)]

        def tracked(comm, r):
            ops.mark_ready(ready[r], 0, n_chunks, 1)  # the producer: every chunk complete, one piece each
            ops.allreduce_tracked(xs[r], res[r], weight, outs[r], EPS, comm._id, two_shot, ctas, chunk_rows,
                                  ready[r], consumed[r], 1, 1)

        world.run(tracked)
        world.synchronize()
        plain_outs = [torch.full_like(residual, float("nan")) for _ in range(W)]
        plain_res = [residual.clone() for _ in range(W)]
        world.run(lambda comm, r: ops.allreduce(xs[r], plain_res[r], weight, plain_outs[r], EPS, comm._id, two_shot,
                                                ctas, 2))
        world.synchronize()
        z_ref, out_ref = _reference(xs, residual, weight)
        for r in range(W):
            assert torch.equal(outs[r], plain_outs[r]) and torch.equal(res[r], plain_res[r]), f"rank {r}"
            assert torch.equal(outs[r], outs[0]), f"rank {r} differs from rank 0"
            assert (consumed[r][:n_chunks] == 1).all() and (consumed[r][n_chunks:] == 0).all()
        torch.testing.assert_close(outs[0].double(), out_ref, rtol=TOL[dtype], atol=4 * TOL[dtype])
        with pytest.raises(ValueError, match="chunk_rows"):
            ops.allreduce_tracked(xs[0], res[0], weight, outs[0], EPS, world.ranks[0]._id, two_shot, ctas, 0,
                                  ready[0], consumed[0], 1, 1)
        world.synchronize()


@pytest.mark.parametrize("W", (2, 4))
@pytest.mark.parametrize("how", ("run", "graphs", "one_graph"))
def test_the_callers_stream_may_be_a_rank_stream(W, how):
    """torch's pooled streams wrap around after 32, so the caller's stream can BE rank 0's stream: the forks to
    the other ranks must not be ordered behind rank 0's kernel (they were once: a timeout at every such call)."""
    T, H = 24, 1024
    with EmulatedWorld(W, max_tokens=64, hidden=H, timeout_ms=3000) as world:
        gen = torch.Generator(world.device).manual_seed(W)
        xs, residual, weight = _inputs(world, T, H, torch.bfloat16, gen)
        res = [residual.clone() for _ in range(W)]
        outs = [torch.full_like(residual, float("nan")) for _ in range(W)]

        def call(comm, r):
            tw.fused_allreduce_rmsnorm(comm, xs[r], res[r], weight, EPS, out=outs[r], algo="two_shot", ctas=2)

        world.run(call)  # warm-up from the default stream: loads every kernel
        world.synchronize()
        for r in res:
            r.copy_(residual)
        side = world.streams[0]  # what a wrapped pool hands out as the caller's stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            if how == "run":
                world.run(call)
            elif how == "graphs":
                graphs = world.capture(call)
                graphs.replay()
            else:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=world.streams[1]):  # the capturing stream is rank 1's
                    world.run(call)
        if how == "one_graph":
            graph.replay()
        torch.cuda.current_stream().wait_stream(side)
        world.synchronize()  # raises a timeout if any rank waited behind another
        z_ref, out_ref = _reference(xs, residual, weight)
        for r in range(W):
            assert torch.equal(outs[r], outs[0]), f"rank {r} differs from rank 0"
        torch.testing.assert_close(outs[0].double(), out_ref, rtol=2e-2, atol=8e-2)


@pytest.mark.parametrize("mode", ("fuse_only", "tokenweave"))
def test_llama_stack_on_symmetric_rows_runs_lean_pull_with_a_sharded_residual(mode, monkeypatch, request):
    """The reference TP Llama (2 layers, W = 4 emulated ranks, one stack per rank) with its partial sums and outputs in
    symmetric memory: the dispatcher runs lean_pull and the residual stays sharded for the parts above the one-shot
    limit. Its output equals the same stacks' without symmetric rows bit for bit (the algorithms compute the same bits),
    matches the float64 model, and agrees across ranks."""
    from tokenweave.models import llama
    from tokenweave.models.llama import LlamaShape, TPLlamaStack, random_hidden_states, reference_forward
    from tokenweave.split import Split
    from tokenweave.weave import SymmetricRows

    W, seq_lens, L = 4, [300, 300], 2
    T = sum(seq_lens)
    shape = LlamaShape(hidden=1024, heads=16, kv_heads=8, head_dim=64, intermediate=2048, rope_theta=10000.0)
    with EmulatedWorld(W, max_tokens=T, hidden=shape.hidden, timeout_ms=20000) as world:
        stacks = [TPLlamaStack(comm, shape, L, dtype=torch.bfloat16, seed=9, sm_partition="off", symmetric_rows=False)
                  for comm in world.ranks]
        assert all(s.rows is None for s in stacks)  # an emulated rank has no collective comm.empty: given below
        for comm in world.ranks:  # the W fused grids must be co-resident beside other ranks' GEMMs: 8 SMs each
            comm._num_sms = 8
        x = random_hidden_states(T, shape.hidden, 9, world.device, torch.bfloat16)
        split = Split(T, 300) if mode == "tokenweave" else Split(T)
        layout = stacks[0].plan(seq_lens, split)
        # No rank may block its host while another rank's kernels spin for it (a context synchronisation, e.g. a
        # first use of a library handle or plan in a thread, would wait for kernels that wait for this rank). So each
        # rank issues from one host thread of its own for the whole test (thread-local caches stay warm), on one
        # stream of its own; RoPE runs eagerly (no compile mid-forward; dynamo is not thread-safe); SDPA avoids cuDNN
        # (its plans are built per thread); and a first forward with a local stand-in for the collective creates every
        # handle, plan and cached block before any rank waits for another.
        monkeypatch.setattr(llama, "_compiled_rope", llama._apply_rope)
        cudnn_sdp = torch.backends.cuda.cudnn_sdp_enabled()
        torch.backends.cuda.enable_cudnn_sdp(False)
        request.addfinalizer(lambda: torch.backends.cuda.enable_cudnn_sdp(cudnn_sdp))
        caller, streams = torch.cuda.current_stream(), [torch.cuda.Stream() for _ in range(W)]
        pools = [ThreadPoolExecutor(max_workers=1) for _ in range(W)]
        request.addfinalizer(lambda: [p.shutdown() for p in pools])

        def on_rank_threads(fn):
            def work(r):
                with torch.cuda.stream(streams[r]):
                    return fn(r)

            for s in streams:
                s.wait_stream(caller)
            futures = [pools[r].submit(work, r) for r in range(W)]
            errors = [f.exception() for f in futures]
            for s in streams:
                caller.wait_stream(s)
            world.synchronize()
            for e in errors:
                if e is not None:
                    raise e
            return [f.result() for f in futures]

        def forward_all():
            return on_rank_threads(lambda r: stacks[r].forward(x, layout, mode))

        import tokenweave.weave as weave
        with monkeypatch.context() as local:
            local.setattr(weave.tw, "fused_allreduce_rmsnorm", lambda comm, x, *a, out=None, **k: out.copy_(x))
            on_rank_threads(lambda r: stacks[r].forward(x, layout, mode))

        plain = forward_all()
        partial, out = world.empty(T, shape.hidden, dtype=torch.bfloat16), world.empty(T, shape.hidden,
                                                                                      dtype=torch.bfloat16)
        for r, s in enumerate(stacks):
            s.rows = SymmetricRows.of(partial[r], out[r])
        # which parts lean_pull runs on, sharded: every part here is above TP4's one-shot limit (512 KiB)
        comm0 = world.ranks[0]
        for a, b in layout.bounds:
            assert comm0.plan(b - a, shape.hidden, 2, lean_ok=True, pull_ok=True).algo == tw.comm.ALGOS["lean_pull"]
        sym = forward_all()
        ref = reference_forward(shape, L, W, 9, x, seq_lens, torch.bfloat16)
        for r in range(W):
            assert torch.equal(sym[r], sym[0]), f"rank {r} differs"
            assert torch.equal(sym[r], plain[r]), f"rank {r}: symmetric rows changed the bits"
            assert sym[r].data_ptr() != out[r].data_ptr()  # a copy: the buffer is reused by the next forward
        rel = float((sym[0].double() - ref).norm() / ref.norm())
        assert rel < 2e-2, rel
