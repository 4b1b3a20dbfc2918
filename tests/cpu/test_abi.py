"""tokenweave/_abi.py (the codes, sizes and offsets Python shares with the kernels) against the C++ headers
themselves, parsed: no GPU and no build needed. tests/gpu/test_abi_gpu.py checks the same values against the
built extension's exports."""
import re
import struct
from pathlib import Path

import pytest

from tokenweave import _abi

HEADERS = Path(__file__).resolve().parents[2] / "csrc" / "include" / "tokenweave"
# C++ enumerators Python has no name for: the dispatcher's "not chosen yet" and "no error".
NOT_IN_PYTHON = {"Algo": {"auto"}, "ErrorCode": {"none"}}
# Enumerator prefixes dropped before comparing (kErrTimeout <-> "timeout", kOpNorm <-> "norm").
PREFIX = {"ErrorCode": "err", "OpBits": "op"}
C_TYPES = {"uint32_t": (4, "I"), "int32_t": (4, "i"), "int64_t": (8, "q"), "uint64_t": (8, "Q")}


def _source():
    if not HEADERS.is_dir():
        pytest.skip("the C++ headers are not next to the tests (an installed package)")
    return "\n".join(re.sub(r"//[^\n]*", "", p.read_text()) for p in sorted(HEADERS.glob("*.h")))


def _enum(name):
    m = re.search(rf"enum\s+(?:class\s+)?{name}\s*:\s*\w+\s*\{{([^}}]*)\}}", _source())
    assert m, f"enum {name} not found in {HEADERS}"
    values = {}
    for k, v in re.findall(r"k(\w+)\s*=\s*(\d+)u?", m.group(1)):
        key = k.lower()
        key = key[len(PREFIX[name]):] if name in PREFIX else key
        values[key] = int(v)
    return {k: v for k, v in values.items() if k not in NOT_IN_PYTHON.get(name, set())}


def _flat(d):
    return {k.replace("_", ""): v for k, v in d.items()}


@pytest.mark.parametrize("cpp,python", [("Algo", "ALGO_CODES"), ("Feed", "FEED_CODES"), ("DType", "DTYPE_CODES"),
                                        ("Transport", "TRANSPORT_CODES"), ("ErrorCode", "ERROR_CODES"),
                                        ("OpBits", "OP_BITS")])
def test_enum_codes_match_the_headers(cpp, python):
    assert _flat(_abi._PYTHON[python]) == _enum(cpp)


def test_limits_match_the_headers():
    src = _source()
    for cpp, python in [("kMaxWorld", "MAX_WORLD"), ("kMaxChunks", "MAX_CHUNKS")]:
        m = re.search(rf"constexpr\s+int\s+{cpp}\s*=\s*(\d+)\s*;", src)
        assert m and int(m.group(1)) == _abi._PYTHON[python], cpp
    for cpp, value in [("kBlockThreads", _abi.ROW_THREADS), ("kMaxVecsPerThread", _abi.ROW_VECS),
                       ("kLeanVecs", _abi.LEAN_VECS)]:
        m = re.search(rf"constexpr\s+int\s+{cpp}\s*=\s*(\d+)\s*;", src)
        assert m and int(m.group(1)) == value, cpp
    assert _abi.MAX_HIDDEN == {2: 32768, 4: 16384}  # what README and the ops' docstrings promise
    assert _abi.LEAN_MAX_HIDDEN == {2: 16384, 4: 8192}


def _struct_layout(name):
    """(offsets, field types, size) of a struct of fixed-width integer fields, with C's natural alignment."""
    m = re.search(rf"struct\s+{name}\s*\{{([^}}]*)\}};", _source())
    assert m, f"struct {name} not found"
    offsets, types, off, align = {}, {}, 0, 1
    for ctype, field, count in re.findall(r"(u?int\d+_t)\s+(\w+)(?:\[(\d+)\])?\s*;", m.group(1)):
        size, code = C_TYPES[ctype]
        off = -(-off // size) * size
        offsets[field], types[field] = off, code
        off += size * int(count or 1)
        align = max(align, size)
    return offsets, types, -(-off // align) * align


def test_call_header_layout_matches_the_header():
    offsets, types, size = _struct_layout("CallHeader")
    assert size == _abi._PYTHON["CALL_HEADER_BYTES"]
    assert {k: v for k, v in offsets.items() if k != "reserved"} == _abi._PYTHON["CALL_HEADER_OFFSETS"]
    assert {k: v for k, v in types.items() if k != "reserved"} == _abi.CALL_HEADER_TYPES
    assert _struct_layout("ErrorRecord")[2] == _abi._PYTHON["ERROR_RECORD_BYTES"]


def test_call_header_round_trip():
    values = {"sig": 0xDEADBEEF, "epoch": 7, "op": 3, "dtype": 2, "tokens": 1 << 33, "hidden": 8192, "ctas": 32,
              "chunk_rows": 16, "algo": 4}
    raw = bytearray(b"\xa5" * _abi.CALL_HEADER_BYTES)  # poisoned: every field must be overwritten
    for name, off in _abi.CALL_HEADER_OFFSETS.items():
        struct.pack_into("<" + _abi.CALL_HEADER_TYPES[name], raw, off, values[name])
    assert _abi.decode_call_header(bytes(raw)) == values
    with pytest.raises(ValueError, match="CallHeader"):
        _abi.decode_call_header(bytes(raw[:32]))
    # headers are [2 parity][MAX_WORLD src]
    assert _abi.call_header_offset(1000, 3, 2) == 1000 + (_abi.MAX_WORLD + 2) * _abi.CALL_HEADER_BYTES
    assert _abi.call_header_offset(1000, 4, 0) == 1000


def test_the_module_values_are_the_python_ones_without_the_extension():
    from tokenweave._ext import _C

    if _C is not None:
        pytest.skip("the extension is built here: tests/gpu/test_abi_gpu.py compares with its exports")
    assert _abi.SOURCE == "python"
    assert _abi.ALGO_CODES == _abi._PYTHON["ALGO_CODES"] and _abi.MAX_CHUNKS == _abi._PYTHON["MAX_CHUNKS"]
    assert _abi.dtype_code(__import__("torch").bfloat16) == _abi._PYTHON["DTYPE_CODES"]["bfloat16"]
