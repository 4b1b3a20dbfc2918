"""Triton track-and-trigger producer (tokenweave.producer_triton) without a GPU.

Pure Python: ready_targets against a model of the kernel's counting loop, and input validation. The kernel
itself runs under Triton's interpreter (TRITON_INTERPRET=1) in a subprocess: triton.jit reads the variable when
the module is imported, so setting it here would turn the kernel of this pytest process into an interpreted
one for every later test (the GPU tests included). The subprocess starts from a copy of os.environ and prints
one JSON line of failures per case.

Interpreter cases (small shapes, fp32 accumulation): y against float64, every element of a NaN-poisoned y
written, ready[] equal to the targets after one call and twice them after two (counters only grow, also
across the int32 wrap), entries past n_chunks untouched; ragged M, N and K, chunk_rows below, above and not a
multiple of BLOCK_M, and a persistent grid smaller than the tile count.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import tokenweave
from tokenweave import producer_triton as pt

# (M, K, N, chunk_rows, dtype, max_programs, counter start)
CASES = [
    (1, 32, 200, 1, "bfloat16", None, 0),  # decode, 2 N-blocks (N ragged), K < BLOCK_K
    (7, 40, 64, 3, "float16", 1, 0),  # one tile over 3 chunks, ragged last chunk, one program
    (300, 80, 200, 100, "bfloat16", 3, 0),  # 128-row tiles across chunk edges, M, N, K ragged, 2 tiles/program
    (200, 64, 128, 48, "float16", 2, 2 ** 31 - 100),  # tiles over 3 chunks each; counters wrap past int32 max
    (65, 128, 130, 65, "bfloat16", None, 0),  # one chunk (pieces_full == pieces_last), BLOCK_M > M
]
# ||y - ref|| / ||ref||: y is rounded once (unit roundoff 2^-9 bf16, 2^-12 fp16); 2x margin, fp32 sums add ~1e-6.
TOL = {"bfloat16": 2 ** -8, "float16": 2 ** -11}
SENTINEL = -7  # in the ready entries past n_chunks: must stay untouched


def _cdiv(a, b):
    return -(-a // b)


def _simulate(M, N, chunk_rows, block_m, block_n):
    """What the kernel's epilogue loop adds to each chunk, tile by tile."""
    added = [0] * _cdiv(M, chunk_rows)
    for r0 in range(0, M, block_m):
        r1 = min(r0 + block_m, M)
        for c in range(r0 // chunk_rows, (r1 - 1) // chunk_rows + 1):
            added[c] += (min(r1, (c + 1) * chunk_rows) - max(r0, c * chunk_rows)) * _cdiv(N, block_n)
    return added


@pytest.mark.parametrize("M,N,chunk_rows,block_n", [(1, 8192, 1, 128), (7, 96, 3, 64), (4097, 8192, 200, 128),
                                                    (1000, 130, 48, 128), (128, 256, 128, 128), (5, 3, 7, 64)])
def test_ready_targets_match_what_every_tiling_adds(M, N, chunk_rows, block_n):
    n_chunks = _cdiv(M, chunk_rows)
    full, last = pt.ready_targets(M, N, chunk_rows, n_chunks, block_n)
    tiles_n = _cdiv(N, block_n)
    assert full == chunk_rows * tiles_n
    assert last == (M - (n_chunks - 1) * chunk_rows) * tiles_n
    for block_m in (16, 64, 128, 256):  # exact whatever BLOCK_M is, also above chunk_rows
        assert _simulate(M, N, chunk_rows, block_m, block_n) == [full] * (n_chunks - 1) + [last]


def test_ready_targets_rejects_bad_chunking_and_int32_overflow():
    with pytest.raises(ValueError, match="n_chunks=3"):
        pt.ready_targets(100, 64, 10, 3, 64)
    with pytest.raises(ValueError, match="chunk_rows=0"):
        pt.ready_targets(100, 64, 0, 1, 64)
    with pytest.raises(ValueError, match="int32"):
        pt.ready_targets(2 ** 24, 2 ** 20, 2 ** 24, 1, 64)  # 2**24 rows x 2**14 N-tiles = 2**38


def test_without_triton_the_call_says_what_to_install(monkeypatch):
    monkeypatch.setattr(pt, "HAS_TRITON", False)
    x = torch.zeros(4, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"tokenweave\.matmul_mark_ready.*pip install triton"):
        pt.matmul_mark_ready(x, torch.zeros(16, 8, dtype=torch.bfloat16), torch.zeros(4, 16, dtype=torch.bfloat16),
                             torch.zeros(1, dtype=torch.int32), 4, 1)


def _valid(M=10, K=8, N=16, dtype=torch.bfloat16):
    return dict(x=torch.zeros(M, K, dtype=dtype), w=torch.zeros(N, K, dtype=dtype), y=torch.zeros(M, N, dtype=dtype),
                ready=torch.zeros(4, dtype=torch.int32), chunk_rows=4, n_chunks=_cdiv(M, 4))


BAD_INPUTS = {
    "not a tensor": (dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    "x 3-D": (dict(x=torch.zeros(2, 5, 8, dtype=torch.bfloat16)), ValueError, "2-D"),
    "float32": (dict(x=torch.zeros(10, 8), w=torch.zeros(16, 8), y=torch.zeros(10, 16)), TypeError, "bfloat16 or"),
    "w dtype": (dict(w=torch.zeros(16, 8, dtype=torch.float16)), TypeError, "one dtype"),
    "y dtype": (dict(y=torch.zeros(10, 16, dtype=torch.float16)), TypeError, "one dtype"),
    "K mismatch": (dict(w=torch.zeros(16, 9, dtype=torch.bfloat16)), ValueError, "x has K=8 but w has K=9"),
    "y shape": (dict(y=torch.zeros(16, 10, dtype=torch.bfloat16)), ValueError, r"\[M, N\] = \[10, 16\]"),
    "w transposed view": (dict(w=torch.zeros(8, 16, dtype=torch.bfloat16).t()), ValueError, "w must be contiguous"),
    "M == 0": (dict(x=torch.zeros(0, 8, dtype=torch.bfloat16), y=torch.zeros(0, 16, dtype=torch.bfloat16),
                    n_chunks=0), ValueError, "nothing to compute"),
    "ready int64": (dict(ready=torch.zeros(4, dtype=torch.int64)), ValueError, "int32"),
    "ready short": (dict(ready=torch.zeros(2, dtype=torch.int32)), ValueError, "at least n_chunks=3"),
    "n_chunks": (dict(n_chunks=2), ValueError, "n_chunks = cdiv"),
    "chunk_rows 0": (dict(chunk_rows=0), ValueError, "chunk_rows >= 1"),
    "max_programs 0": (dict(max_programs=0), ValueError, "max_programs=0"),
    "float chunk_rows": (dict(chunk_rows=4.0), TypeError, "chunk_rows must be an int"),
    "two devices": (dict(w=torch.zeros(16, 8, dtype=torch.bfloat16, device="meta")), ValueError, "one device"),
    "CPU": ({}, ValueError, "move them to a CUDA device"),
}


@pytest.mark.skipif(not pt.HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_validation_names_the_op_and_the_fix(case, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CPU tensors are then refused, after every other check
    change, exc, pattern = BAD_INPUTS[case]
    kwargs = {**_valid(), **change}
    with pytest.raises(exc, match=pattern) as info:
        pt.matmul_mark_ready(**kwargs)
    assert "tokenweave.matmul_mark_ready" in str(info.value)


def _case_id(case):
    M, K, N, chunk_rows, dtype, max_programs, start = case
    return f"M{M}-K{K}-N{N}-rows{chunk_rows}-{dtype}-progs{max_programs}-start{start}"


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(tokenweave.__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_interpreted_kernel(case, interpreted):
    failures = interpreted[_case_id(case)]
    assert not failures, "\n".join(failures)


# ---- the subprocess (TRITON_INTERPRET=1) ----

def _patch_interpreter():
    """Work around two bugs of Triton 3.6's interpreter (test-only; the compiled kernel is unaffected).

    1. NumPy >= 2.4 refuses int() of a 1-element 1-D array, which the interpreter's Tensor.__index__ does for
       every loop bound held in a tensor (triton-lang/triton#9171, fixed after 3.6).
    2. The interpreter keeps bfloat16 as raw uint16 bits and tl.dot multiplies those bits (bf16 is documented as
       unsupported by the interpreter, triton-lang/triton#11584): convert bf16 operands to float32 first, which
       is exact, as the tensor cores' products are.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(())))

    interpreter._patch_lang_tensor = _patch_lang_tensor

    create_dot = interpreter.InterpreterBuilder.create_dot

    def _to_f32(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        data = interpreter._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return interpreter.TensorHandle(data, tl.float32)

    def _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, _to_f32(a), _to_f32(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = _create_dot


def _run_case(M, K, N, chunk_rows, dtype, max_programs, start):
    dtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(M * 1009 + K * 31 + N)
    w = torch.randn(N, K, generator=g).to(dtype)
    n_chunks = _cdiv(M, chunk_rows)
    block_n = pt.BLOCK_N
    targets = pt.ready_targets(M, N, chunk_rows, n_chunks, block_n)
    per_chunk = [targets[0]] * (n_chunks - 1) + [targets[1]]
    ready = torch.full((n_chunks + 3,), SENTINEL, dtype=torch.int32)
    ready[:n_chunks] = start
    failures = []
    for call in (1, 2):
        x = torch.randn(M, K, generator=g).to(dtype)
        y = torch.full((M, N), float("nan"), dtype=dtype)
        pieces = pt.matmul_mark_ready(x, w, y, ready, chunk_rows, n_chunks, max_programs=max_programs)
        if pieces != targets:
            failures.append(f"call {call}: returned {pieces}, ready_targets says {targets}")
        if torch.isnan(y).any():
            failures.append(f"call {call}: {int(torch.isnan(y).sum())} elements of y not written")
        else:
            ref = x.double() @ w.double().t()
            err = float((y.double() - ref).norm() / ref.norm())
            if err > TOL[str(dtype).split(".")[1]]:
                failures.append(f"call {call}: y rel err {err:.3g}")
        want = [(start + call * t + 2 ** 31) % 2 ** 32 - 2 ** 31 for t in per_chunk] + [SENTINEL] * 3
        if ready.tolist() != want:
            failures.append(f"call {call}: ready {ready.tolist()}, want {want}")
    return failures


def _main():
    _patch_interpreter()
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(pt._matmul_mark_ready_kernel, InterpretedFunction), "TRITON_INTERPRET=1 was not seen"
    results = {}
    for case in CASES:
        try:
            results[_case_id(case)] = _run_case(*case)
        except Exception as e:  # report it under the case rather than losing the other cases
            results[_case_id(case)] = [f"raised {type(e).__name__}: {e}"]
    print(json.dumps(results))


if __name__ == "__main__":
    _main()
