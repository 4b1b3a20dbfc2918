"""Triton track-and-trigger producer (tokenweave.producer_triton) on one GPU.

Per shape (M in {1, 7, 1000, 4097}, K in {1024, 3584}, N = 8192, bf16 and fp16): y against float64, every
element of a NaN-poisoned y written, ready[] exactly the targets after one call and twice them after two,
entries past n_chunks untouched. CUDA-graph capture, then 3 replays with new x. And a spinning consumer on
another stream that copies each chunk as soon as its counter reaches the target: the copy must equal y, so a
release that came before its tile's stores shows as NaN or stale rows.
"""
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from tokenweave import producer_triton as pt  # noqa: E402


def needs_gpus(n):
    return pytest.mark.skipif(torch.cuda.device_count() < n, reason=f"needs {n} GPUs, found {torch.cuda.device_count()}")


pytestmark = [pytest.mark.gpu, needs_gpus(1)]
N = 8192
# ||y - ref|| / ||ref||: y is rounded once (unit roundoff 2^-9 bf16, 2^-12 fp16); 2x margin, fp32 sums add ~1e-6.
TOL = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}
SENTINEL = -7  # in the ready entries past n_chunks: must stay untouched
# chunk_rows per M: below BLOCK_M, not a multiple of it, above it; every last chunk ragged but M=1's
CHUNK_ROWS = {1: 1, 7: 3, 1000: 48, 4097: 200}


def _cdiv(a, b):
    return -(-a // b)


def _inputs(seed, M, K, dtype):
    """x [M, K] ~ N(0, 1), w [N, K] ~ N(0, 1/K) (so y ~ N(0, 1)), and the generator for further x."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(M, K, generator=g, device="cuda").to(dtype)
    w = (torch.randn(N, K, generator=g, device="cuda") / K ** 0.5).to(dtype)
    return x, w, g


def _counters(n_chunks):
    ready = torch.full((n_chunks + 3,), SENTINEL, dtype=torch.int32, device="cuda")
    ready[:n_chunks] = 0
    return ready


def _check(label, x, w, y, ready, targets, n_chunks, calls):
    """y against float64 and the counters after `calls` calls; returns the failures."""
    bad = []
    if torch.isnan(y).any():
        bad.append(f"{label}: {int(torch.isnan(y).sum())} elements of y not written")
    else:
        ref = x.double() @ w.double().t()
        err = float((y.double() - ref).norm() / ref.norm())
        if err > TOL[y.dtype]:
            bad.append(f"{label}: y rel err {err:.3g}")
    want = [calls * targets[0]] * (n_chunks - 1) + [calls * targets[1]] + [SENTINEL] * 3
    got = ready.tolist()
    if got != want:
        bad.append(f"{label}: ready {got[:8]}... != {want[:8]}... (first difference at "
                   f"{next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)})")
    return bad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("K", [1024, 3584])
@pytest.mark.parametrize("M", [1, 7, 1000, 4097])
def test_matches_float64_and_counts_exactly(M, K, dtype):
    chunk_rows = CHUNK_ROWS[M]
    n_chunks = _cdiv(M, chunk_rows)
    max_programs = None if K == 1024 else 100  # the whole GPU, or what a 32-CTA consumer leaves of 132 SMs
    targets = pt.ready_targets(M, N, chunk_rows, n_chunks, pt.BLOCK_N)
    x, w, g = _inputs(M * 7 + K, M, K, dtype)
    ready = _counters(n_chunks)
    bad = []
    for call in (1, 2):
        if call == 2:
            x = torch.randn(M, K, generator=g, device="cuda").to(dtype)
        y = torch.full((M, N), float("nan"), dtype=dtype, device="cuda")
        pieces = pt.matmul_mark_ready(x, w, y, ready, chunk_rows, n_chunks, max_programs=max_programs)
        torch.cuda.synchronize()
        if pieces != targets:
            bad.append(f"call {call}: returned {pieces}, ready_targets says {targets}")
        bad += _check(f"call {call}", x, w, y, ready, targets, n_chunks, call)
    assert not bad, "\n".join(bad)


def test_cuda_graph_replays_with_new_inputs():
    M, K, dtype, chunk_rows = 1000, 3584, torch.bfloat16, 48
    n_chunks = _cdiv(M, chunk_rows)
    x, w, g = _inputs(11, M, K, dtype)
    y = torch.full((M, N), float("nan"), dtype=dtype, device="cuda")
    ready = _counters(n_chunks)
    # eager first: compiles and loads the kernel, which capture cannot do
    targets = pt.matmul_mark_ready(x, w, y, ready, chunk_rows, n_chunks, max_programs=100)
    torch.cuda.synchronize()
    bad = _check("eager", x, w, y, ready, targets, n_chunks, 1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        assert pt.matmul_mark_ready(x, w, y, ready, chunk_rows, n_chunks, max_programs=100) == targets
    torch.cuda.synchronize()
    bad += _check("after capture (nothing ran)", x, w, y, ready, targets, n_chunks, 1)
    for replay in (1, 2, 3):
        x.copy_(torch.randn(M, K, generator=g, device="cuda"))
        y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        bad += _check(f"replay {replay}", x, w, y, ready, targets, n_chunks, 1 + replay)
    assert not bad, "\n".join(bad)


@triton.jit
def _consume_kernel(y_ptr, out_ptr, ready_ptr, timeouts_ptr, M, N, chunk_rows, n_chunks, want_full, want_last,
                    MAX_POLLS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program per chunk: acquire-poll ready[c] (bounded) until it reaches its target, then copy the chunk."""
    c = tl.program_id(0)
    want = tl.where(c == n_chunks - 1, want_last, want_full)
    seen = tl.atomic_add(ready_ptr + c, 0, sem="acquire", scope="gpu")
    polls = 0
    while (seen < want) & (polls < MAX_POLLS):
        seen = tl.atomic_add(ready_ptr + c, 0, sem="acquire", scope="gpu")
        polls += 1
    if seen < want:
        tl.atomic_add(timeouts_ptr, 1)
    else:
        r0 = c * chunk_rows
        r1 = tl.minimum(r0 + chunk_rows, M)
        for r in range(r0, r1, BLOCK_R):
            rows = r + tl.arange(0, BLOCK_R)
            for n in range(0, N, BLOCK_C):
                cols = n + tl.arange(0, BLOCK_C)
                offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
                mask = (rows[:, None] < r1) & (cols[None, :] < N)
                # .cg: read at L2, the gpu-scope point of coherence, never through the read-only path
                tl.store(out_ptr + offs, tl.load(y_ptr + offs, mask=mask, cache_modifier=".cg"), mask=mask)


@pytest.mark.parametrize("chunk_rows", [64, 200])
def test_a_spinning_consumer_sees_whole_chunks(chunk_rows):
    M, K, dtype = 4097, 1024, torch.bfloat16
    n_chunks = _cdiv(M, chunk_rows)
    x, w, _ = _inputs(21 + chunk_rows, M, K, dtype)
    targets = pt.ready_targets(M, N, chunk_rows, n_chunks, pt.BLOCK_N)
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    main = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    bad = []
    for rep in range(5):
        y = torch.full((M, N), float("nan"), dtype=dtype, device="cuda")
        out = torch.full_like(y, float("nan"))
        ready = torch.zeros(n_chunks, dtype=torch.int32, device="cuda")
        timeouts = torch.zeros(1, dtype=torch.int32, device="cuda")
        side.wait_stream(main)
        with torch.cuda.stream(side):  # first, so that it spins while the producer runs
            _consume_kernel[(n_chunks,)](y, out, ready, timeouts, M, N, chunk_rows, n_chunks, *targets,
                                         MAX_POLLS=1 << 22, BLOCK_R=16, BLOCK_C=512, num_warps=4)
        pt.matmul_mark_ready(x, w, y, ready, chunk_rows, n_chunks, max_programs=sms - 32)
        main.wait_stream(side)
        torch.cuda.synchronize()
        if int(timeouts.item()):
            bad.append(f"rep {rep}: {int(timeouts.item())} chunks never reached their target")
        elif not torch.equal(out.view(torch.int16), y.view(torch.int16)):
            diff = (out.view(torch.int16) != y.view(torch.int16)).any(1).nonzero().flatten()
            bad.append(f"rep {rep}: consumer copy differs from y in {diff.numel()} rows (first {diff[:5].tolist()})")
    assert not bad, "\n".join(bad)
