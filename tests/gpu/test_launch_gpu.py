"""One GPU: every add + RMSNorm block shape, and programmatic dependent launch (PDL).

- Every block shape of csrc/kernels/launch.cu (the op's ``shape``) matches float64 and writes every element
  (outputs are NaN-poisoned first); the shapes the card's config switches between by size give the same bits.
- With PDL on, a kernel may start while the one before it in its stream finishes. A chain in which a kernel
  rewrites x right before each tokenweave call (captured in a CUDA graph and replayed) must give the same
  bits as with PDL off: a kernel that read x before its wait would see the old x. The writer is a torch
  kernel, or a Triton kernel that triggers its dependents first (griddepcontrol.launch_dependents) and then
  spins 20 us before it writes: our kernel then surely starts before x is written. The same for every
  collective algorithm in the emulated world (W ranks on this GPU).
- The benchmarks' copy yardstick (``_C.stream_copy``) copies every byte and refuses what it cannot copy.
"""
from __future__ import annotations

import pytest
import torch

import tokenweave as tw

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("experimental_lean_bulk")]  # lean_bulk too

if not (torch.cuda.is_available() and tw.HAS_EXTENSION):
    pytest.skip("needs a CUDA GPU and the tokenweave extension", allow_module_level=True)

from tokenweave._ext import _C  # noqa: E402
from tokenweave import tuning  # noqa: E402
from tokenweave.testing import EmulatedWorld  # noqa: E402

EPS = 1e-5
TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-5}
WRITERS = ("torch", "early_trigger")
LATE_NS = 20_000  # the early-triggering writer's spin before it writes x: far longer than a launch

try:
    import triton
    import triton.language as tl

    @triton.jit
    def _late_rewrite_kernel(x_ptr, n, scale, shift, delay_ns, BLOCK: tl.constexpr):
        # Let the next kernel in the stream launch now (it is launched with PDL), then write x only later.
        zero = tl.inline_asm_elementwise("griddepcontrol.launch_dependents;\n mov.u32 $0, 0;", "=r", [],
                                         dtype=tl.int32, is_pure=False, pack=1)
        start = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                          pack=1)
        now = start
        while now - start < delay_ns:
            now = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                            pack=1)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        v = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
        tl.store(x_ptr + offs, (v * scale + shift + zero.to(tl.float32)).to(x_ptr.dtype.element_ty), mask=mask)
except ImportError:  # pragma: no cover - the GPU image has Triton
    triton = None


def _rewrite_x(writer, x, scale, shift):
    """x <- x * scale + shift in place, by the chosen writer (see the module docstring)."""
    if writer == "torch":
        x.mul_(scale).add_(shift)
        return
    if triton is None:
        pytest.skip("the early-triggering writer needs Triton")
    n = x.numel()
    _late_rewrite_kernel[(triton.cdiv(n, 1024),)](x, n, scale, shift, LATE_NS, BLOCK=1024)


@pytest.fixture
def pdl():
    """Restores the process's PDL setting after the test."""
    before = tw.programmatic_launch()
    yield
    tw.set_programmatic_launch(before)


def _norm_inputs(tokens, hidden, dtype, seed):
    gen = torch.Generator("cuda").manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen, device="cuda").to(dtype)
    residual = torch.randn(tokens, hidden, generator=gen, device="cuda").to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen, device="cuda")).to(dtype)
    return x, residual, weight


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32), ids=str)
@pytest.mark.parametrize("tokens,hidden", ((1, 4096), (5, 1032), (37, 8192), (1000, 2056), (300, 16384),
                                          (7, 6152)))
def test_every_norm_shape_matches_float64(dtype, tokens, hidden):
    """Each shape within tolerance of float64, every element written; the two-pass shape 9 (256 threads,
    the default's row groups) with the bits of shape 1, the one-pass shape it replaces."""
    x, residual, weight = _norm_inputs(tokens, hidden, dtype, tokens * 7 + hidden)
    z = x.double() + residual.double()
    ref = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + EPS) * weight.double()
    got, res_of = {}, {}
    for k in range(_C.add_rmsnorm_configs()):
        res = residual.clone()
        out = torch.full_like(x, float("nan"))
        if _C.add_rmsnorm_row_group(k, hidden, x.element_size()) < 0:  # says it cannot hold the row: must refuse
            with pytest.raises(RuntimeError, match="invalid argument"):
                torch.ops.tokenweave.add_rmsnorm(x, res, weight, out, EPS, k)
            continue
        torch.ops.tokenweave.add_rmsnorm(x, res, weight, out, EPS, k)  # says it can: must run
        torch.cuda.synchronize()
        assert not out.isnan().any() and not res.isnan().any(), f"config {k}: elements left unwritten"
        err = ((out.double() - ref).abs() / (ref.abs() + 1)).max().item()
        assert err < TOL[dtype], f"config {k}: rel err {err:.3g}"
        res_err = ((res.double() - z).abs() / (z.abs() + 1)).max().item()
        assert res_err < TOL[dtype], f"config {k}: residual rel err {res_err:.3g}"
        got[k], res_of[k] = out, res
    assert 0 in got and 9 in got and 10 in got
    if 1 in got:
        assert torch.equal(got[9], got[1]), "two-pass shape 9: other bits than one-pass shape 1"
    # the row group decides the summation order: every shape with shape 0's group has shape 0's bits
    group = {k: _C.add_rmsnorm_row_group(k, hidden, x.element_size()) for k in [0, *got]}
    assert all(g > 0 for g in group.values())
    same_group = [k for k in got if group[k] == group[0]]
    for k in same_group:
        assert torch.equal(got[k], got[0]), f"shape {k} has shape 0's row group but other bits"
    # what the card's config picks at any batch size gives one set of bits (batch invariance): shape 0's, or, where a
    # family of shapes that sums in another order serves the hidden (tokenweave.tune: every count or none), the
    # family's: its members, switched by batch size, must agree bit for bit (and shape 0 is then never picked)
    card = tuning.device_slug()
    picked = sorted({tuning.norm_shape(card, T, hidden, x.element_size()) for T in (1, 128, 1024, 4096, 16384)})
    for k in picked:
        assert torch.equal(got[k], got[picked[0]]), f"{card}: configured shapes {picked} give other bits by batch"
        assert torch.equal(res_of[k], res_of[picked[0]]), f"{card}: configured shapes {picked}: residual differs"


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
@pytest.mark.parametrize("case", ("no_residual", "in_place"))
@pytest.mark.parametrize("tokens,hidden", ((3, 8192), (2011, 1032), (600, 16384), (5, 12288), (3, 32768),
                                          (7, 6152), (9, 2056)))
def test_every_norm_shape_without_residual_and_in_place(dtype, case, tokens, hidden):
    """No residual (z = x), and out = x: every shape with shape 0's row group gives shape 0's bits and writes
    every element; every other shape that holds the row stays within tolerance of float64; a shape that says it
    cannot hold the row refuses it. 12288 x 4 bytes puts the shared-memory shapes at 48 KiB of dynamic memory
    (with their static arrays above it: the opt-in); 32768 takes them to 64-256 KiB a CTA (256 KiB: refused)."""
    x, residual, weight = _norm_inputs(tokens, hidden, dtype, 3 * tokens + hidden)
    if case == "no_residual":
        residual = None
    z = x.double() + (residual.double() if residual is not None else 0)
    ref = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + EPS) * weight.double()

    def run(shape):
        res = residual.clone() if residual is not None else None
        xin = x.clone()
        out = xin if case == "in_place" else torch.full_like(x, float("nan"))
        torch.ops.tokenweave.add_rmsnorm(xin, res, weight, out, EPS, shape)
        torch.cuda.synchronize()
        return out, res

    group0 = _C.add_rmsnorm_row_group(0, hidden, x.element_size())  # < 0 for float32 32768: beyond shape 0
    out0, res0 = run(0) if group0 > 0 else (None, None)
    for shape in range(1, _C.add_rmsnorm_configs()):
        if _C.add_rmsnorm_row_group(shape, hidden, x.element_size()) < 0:  # cannot hold the row: must refuse
            with pytest.raises(RuntimeError, match="invalid argument"):
                run(shape)
            continue
        out, res = run(shape)
        assert not out.isnan().any(), f"shape {shape}: elements left unwritten"
        err = ((out.double() - ref).abs() / (ref.abs() + 1)).max().item()
        assert err < TOL[dtype], f"shape {shape}: rel err {err:.3g}"
        if group0 > 0 and _C.add_rmsnorm_row_group(shape, hidden, x.element_size()) == group0:
            assert torch.equal(out, out0), f"shape {shape}: shape 0's row group but other bits"
            if res is not None:
                assert torch.equal(res, res0), f"shape {shape}: residual differs from shape 0's"


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("tokens,hidden", ((37, 8192), (300, 4096), (5, 2048)))
def test_a_zero_residual_gives_the_bits_of_none(dtype, tokens, hidden):
    """x + 0 is x exactly, so a residual of zeros must give every shape the bits it gives without a residual (and
    leave x as the residual). For the 8-byte-piece shapes whose row fills them (launch.cu kExact: 16, 19, 20, 22, 23,
    26 at 8192; 17, 18, 21, 24, 25, 27 at 4096; none at 2048, where shapes 0-15 run) this compares their branch-free
    form, taken with a residual, with their general form, taken without."""
    x, _, weight = _norm_inputs(tokens, hidden, dtype, 11 * tokens + hidden)
    for shape in range(_C.add_rmsnorm_configs()):
        if _C.add_rmsnorm_row_group(shape, hidden, x.element_size()) < 0:
            continue
        outs = []
        for residual in (torch.zeros_like(x), None):
            out = torch.full_like(x, float("nan"))
            torch.ops.tokenweave.add_rmsnorm(x, residual, weight, out, EPS, shape)
            torch.cuda.synchronize()
            assert not out.isnan().any(), f"shape {shape}: elements left unwritten"
            if residual is not None:
                assert torch.equal(residual, x), f"shape {shape}: the residual is not x + 0"
            outs.append(out)
        assert torch.equal(outs[0], outs[1]), f"shape {shape}: a zero residual gives other bits than none"


@pytest.mark.parametrize("writer", WRITERS)
def test_pdl_chain_in_a_graph_gives_the_same_bits(pdl, writer):
    """x is rewritten by a kernel right before each add_rmsnorm: the norm must wait for it."""
    tokens, hidden, dtype = 64, 8192, torch.bfloat16
    x, residual, weight = _norm_inputs(tokens, hidden, dtype, 3)
    results = {}
    for on in (False, True):
        tw.set_programmatic_launch(on)
        xs, res, out = x.clone(), residual.clone(), torch.empty_like(x)
        outs = []

        def chain():
            for i in range(8):
                _rewrite_x(writer, xs, 1.0 + 1.0 / 64, 0.25 * (i + 1))  # the previous kernel writes x ...
                tw.add_rmsnorm(xs, res, weight, EPS, out=out)  # ... which this call reads after its wait
                outs.append(out.clone())

        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            chain()  # warm-up (eager), then capture from the same starting values
            xs.copy_(x), res.copy_(residual), outs.clear()
            torch.cuda.synchronize()
            with torch.cuda.graph(graph, stream=stream):
                chain()
        for _ in range(3):  # replays from the same starting values
            xs.copy_(x), res.copy_(residual)
            graph.replay()
        torch.cuda.synchronize()
        results[on] = torch.stack(outs), res.clone()
    assert torch.equal(results[True][0], results[False][0]) and torch.equal(results[True][1], results[False][1])
    assert not results[True][0].isnan().any()


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("W", (2, 4))
@pytest.mark.parametrize("algo", ("one_shot", "two_shot", "lamport", "lean", "lean_bulk", "lamport_two_shot"))
def test_pdl_collectives_in_the_emulated_world(pdl, W, algo, writer):
    """Every rank's stream: a kernel rewrites x, then the fused call, 6 times; graph-replayed."""
    tokens, hidden, dtype = 40, 4096, torch.bfloat16
    with EmulatedWorld(W, max_tokens=512, hidden=hidden, dtype=dtype, timeout_ms=5000) as world:
        gen = torch.Generator("cuda").manual_seed(W * 10 + len(algo))
        xs0 = [torch.randn(tokens, hidden, generator=gen, device="cuda").to(dtype) for _ in range(W)]
        residual = torch.randn(tokens, hidden, generator=gen, device="cuda").to(dtype)
        weight = (1 + 0.1 * torch.randn(hidden, generator=gen, device="cuda")).to(dtype)
        lean = algo.startswith("lean")
        results = {}
        for on in (False, True):
            tw.set_programmatic_launch(on)
            xs = [x.clone() for x in xs0]
            outs = world.empty(tokens, hidden, dtype=dtype) if lean else [torch.empty_like(residual) for _ in xs]
            res = world.empty(tokens, hidden, dtype=dtype) if lean else [residual.clone() for _ in xs]
            snaps = [[] for _ in range(W)]

            def step(comm, r):
                for i in range(6):
                    _rewrite_x(writer, xs[r], 1.0 + 1.0 / 32, 0.125 * (i + 1))
                    tw.fused_allreduce_rmsnorm(comm, xs[r], res[r], weight, EPS, out=outs[r], algo=algo)
                    snaps[r].append(outs[r].clone())

            def reset():
                for r in range(W):
                    xs[r].copy_(xs0[r])
                    res[r].copy_(residual)
                    snaps[r].clear()

            reset()
            world.run(step)  # eager first: loads every kernel
            world.synchronize()
            eager = [torch.stack(s) for s in snaps]
            reset()
            world.synchronize()
            graph = world.capture(step)  # one graph per rank, as on W GPUs (EmulatedWorld.capture says why)
            for _ in range(3):
                for r in range(W):
                    xs[r].copy_(xs0[r])
                    res[r].copy_(residual)
                graph.replay()
                world.synchronize()
            replayed = [torch.stack(s) for s in snaps]
            for r in range(W):
                assert torch.equal(replayed[r], eager[r]), f"PDL {on}: rank {r} graph replay differs from eager"
                assert torch.equal(replayed[r], replayed[0]), f"PDL {on}: rank {r} differs from rank 0"
            results[on] = replayed[0]
        assert not results[True].isnan().any()
        assert torch.equal(results[True], results[False]), "PDL on gives other bits than PDL off"


@pytest.mark.parametrize("nbytes", [16, 4096 + 48, (1 << 20) + 16 * 7, 3 * (1 << 24) + 16 * 1001])
def test_stream_copy_copies_every_byte(nbytes):
    """The benchmarks' copy yardstick (_C.stream_copy): every byte of random data lands, at sizes that leave a
    partial grid-stride step, into a poisoned destination at an offset; nothing past the end is written."""
    g = torch.Generator(device="cuda").manual_seed(nbytes)
    src = torch.randint(0, 256, (nbytes + 32,), dtype=torch.uint8, device="cuda", generator=g)[16:16 + nbytes]
    dst_full = torch.full((nbytes + 64,), 0xA5, dtype=torch.uint8, device="cuda")
    dst = dst_full[32:32 + nbytes]
    _C.stream_copy(dst, src)
    torch.cuda.synchronize()
    assert torch.equal(dst, src)
    assert bool((dst_full[:32] == 0xA5).all()) and bool((dst_full[32 + nbytes:] == 0xA5).all())


def test_stream_copy_rejects_what_it_cannot_copy():
    src = torch.zeros(64, dtype=torch.uint8, device="cuda")
    with pytest.raises((ValueError, RuntimeError), match="tokenweave.stream_copy: .*equal size"):
        _C.stream_copy(torch.empty(48, dtype=torch.uint8, device="cuda"), src)
    with pytest.raises((ValueError, RuntimeError), match="tokenweave.stream_copy: .*multiples of 16"):
        _C.stream_copy(torch.empty(24, dtype=torch.uint8, device="cuda"), src[:24])
    with pytest.raises((ValueError, RuntimeError), match="tokenweave.stream_copy: .*multiples of 16"):
        _C.stream_copy(torch.empty(32, dtype=torch.uint8, device="cuda"), src[8:40])
    with pytest.raises((ValueError, RuntimeError), match="tokenweave.stream_copy: .*CUDA"):
        _C.stream_copy(torch.empty(64, dtype=torch.uint8), src)


def test_nominal_memory_bandwidth_is_the_cards():
    """The benchmarks' nominal memory bandwidth (2 x memory clock x bus width): 3.35 TB/s on an H100 SXM, 4.8 on an
    H200; any card this library runs on lies between 1 and 10 TB/s."""
    assert 1000 < _C.nominal_memory_gbps() < 10000
