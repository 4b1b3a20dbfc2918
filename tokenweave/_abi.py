"""The CUDA extension's interface as Python sees it: enum codes, limits, struct sizes and field offsets.

One Python definition (``_PYTHON`` below), used where the extension is not built (the CPU build). Where it
is built, its exports (``m.attr`` in csrc/torch_ops.cpp's PYBIND11_MODULE) are used instead, name by name,
so the kernels' headers stay the single source of truth. tests/cpu/test_abi.py checks the Python values
against csrc/include/tokenweave/types.h and plan.h (no GPU and no build needed) and against the exports
(where the extension is built).
"""
from __future__ import annotations

import struct

from tokenweave._ext import _C

# As declared in csrc/include/tokenweave/types.h (enums, limits, structs) and plan.h (OpBits).
_PYTHON = {
    # enum class Algo; kAuto = 0 is the dispatcher's "not chosen yet", never a user-facing algorithm
    "ALGO_CODES": {"one_shot": 1, "two_shot": 2, "lamport": 3, "lean": 4, "lamport_two_shot": 5, "lean_bulk": 6,
                   "lean_pull": 7},
    "FEED_CODES": {"resident": 0, "tracked": 1, "copy_engine": 2},           # enum class Feed
    "DTYPE_CODES": {"float32": 0, "float16": 1, "bfloat16": 2},             # enum class DType
    "TRANSPORT_CODES": {"p2p": 0, "multimem": 1},                           # enum class Transport
    "ERROR_CODES": {"timeout": 1, "mismatch": 2, "producer_timeout": 3},    # enum ErrorCode (kErrNone = 0)
    "OP_BITS": {"residual": 1, "norm": 2, "sharded_residual": 4},           # enum OpBits
    "MAX_WORLD": 8,                                                         # kMaxWorld
    "MAX_CHUNKS": 4096,                                                     # kMaxChunks
    "CALL_HEADER_BYTES": 64,                                                # sizeof(CallHeader)
    "CALL_HEADER_OFFSETS": {"sig": 0, "epoch": 4, "op": 8, "dtype": 12, "tokens": 16, "hidden": 24, "ctas": 28,
                            "chunk_rows": 32, "algo": 36},                  # offsetof(CallHeader, ...)
    "ERROR_RECORD_BYTES": 64,                                               # sizeof(ErrorRecord): 8 int64
}
# struct codes of CallHeader's fields (little-endian, as the GPU writes them); C++ cannot export types.
CALL_HEADER_TYPES = {"sig": "I", "epoch": "I", "op": "I", "dtype": "i", "tokens": "q", "hidden": "i", "ctas": "i",
                     "chunk_rows": "i", "algo": "i"}


def _value(name: str):
    """The extension's export of ``name`` where it has one, else the Python definition."""
    exported = getattr(_C, name, None) if _C is not None else None
    if exported is None:
        return _PYTHON[name]
    return {str(k): int(v) for k, v in dict(exported).items()} if isinstance(_PYTHON[name], dict) else int(exported)


ALGO_CODES: dict[str, int] = _value("ALGO_CODES")
FEED_CODES: dict[str, int] = _value("FEED_CODES")
DTYPE_CODES: dict[str, int] = _value("DTYPE_CODES")
TRANSPORT_CODES: dict[str, int] = _value("TRANSPORT_CODES")
ERROR_CODES: dict[str, int] = _value("ERROR_CODES")
OP_BITS: dict[str, int] = _value("OP_BITS")
MAX_WORLD: int = _value("MAX_WORLD")
MAX_CHUNKS: int = _value("MAX_CHUNKS")
CALL_HEADER_BYTES: int = _value("CALL_HEADER_BYTES")
CALL_HEADER_OFFSETS: dict[str, int] = _value("CALL_HEADER_OFFSETS")
ERROR_RECORD_BYTES: int = _value("ERROR_RECORD_BYTES")
# The row epilogue holds a row in at most kBlockThreads threads x kMaxVecsPerThread 16-byte vectors (types.h;
# checked against the header in tests/cpu/test_abi.py): the largest hidden size per element size follows.
ROW_THREADS, ROW_VECS = 512, 8
MAX_HIDDEN: dict[int, int] = {itemsize: ROW_THREADS * ROW_VECS * 16 // itemsize for itemsize in (2, 4)}
# A lean owner holds kLeanVecs vectors per thread (types.h): the largest hidden lean and lean_bulk take.
LEAN_VECS = 4
LEAN_MAX_HIDDEN: dict[int, int] = {itemsize: ROW_THREADS * LEAN_VECS * 16 // itemsize for itemsize in (2, 4)}
SOURCE = "extension" if _C is not None and hasattr(_C, "ALGO_CODES") else "python"


def dtype_code(dtype) -> int:
    """The kernels' DType code of a torch dtype (``torch.bfloat16`` -> 2); KeyError for other dtypes."""
    return DTYPE_CODES[str(dtype).replace("torch.", "")]


def call_header_offset(headers_off: int, epoch: int, src: int) -> int:
    """Byte offset in a workspace of the CallHeader rank ``src`` wrote for call ``epoch`` (headers are
    ``[2 parity][MAX_WORLD src]``)."""
    return int(headers_off) + ((int(epoch) & 1) * MAX_WORLD + int(src)) * CALL_HEADER_BYTES


def decode_call_header(raw: bytes) -> dict:
    """The fields of one CallHeader read back from a workspace (``CALL_HEADER_BYTES`` bytes)."""
    if len(raw) < CALL_HEADER_BYTES:
        raise ValueError(f"tokenweave: a CallHeader has {CALL_HEADER_BYTES} bytes, got {len(raw)}")
    return {name: struct.unpack_from("<" + CALL_HEADER_TYPES[name], raw, off)[0]
            for name, off in CALL_HEADER_OFFSETS.items()}
