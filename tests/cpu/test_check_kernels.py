"""The SASS checks of .ci/check_kernels.py on synthetic disassembly: each must fail on what it guards against."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("check_kernels", ROOT / ".ci" / "check_kernels.py")
ck = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ck)


def _sass(*lines: str) -> str:
    return "\n".join(f"        /*{16 * i:04x}*/                   {line} ;" for i, line in enumerate(lines))


def test_narrow_loads_of_a_data_vector_fail_and_state_words_pass():
    # the pattern the by-reference unpack compiled to: a 16-byte vector read as four 4-byte loads
    quartered = [f"LDG.E R{4 + k}, desc[UR4][R2.64+0x{4 * k:x}]" for k in range(4)] * 3
    assert ck.narrow_load_problems("k", _sass(*quartered))
    # a few state words, 16-byte data loads and flag polls (.STRONG) are fine
    ok = _sass("LDG.E R5, desc[UR4][R2.64]", "LDG.E.64 R6, desc[UR4][R8.64]",
               *["LDG.E.128 R8, desc[UR4][R10.64]"] * 20, *["LDG.E.STRONG.SYS R0, desc[UR4][R12.64]"] * 20,
               *["LDG.E.128.STRONG.SYS R8, desc[UR4][R12.64]"] * 5)
    assert ck.narrow_load_problems("k", ok) == []


def test_the_narrow_load_bound_is_strict():
    at = _sass(*["LDG.E R5, desc[UR4][R2.64]"] * ck.MAX_NARROW_LOADS)
    over = _sass(*["LDG.E.U16 R5, desc[UR4][R2.64]"] * (ck.MAX_NARROW_LOADS + 1))
    assert ck.narrow_load_problems("k", at) == []
    assert ck.narrow_load_problems("k", over)


def test_transport_problems_tell_multimem_from_p2p():
    mc = _sass("LDGMC.E.ADD.F32x4.BF16x8.RN.STRONG.SYS R4, desc[UR4][R2.64]", "STG.E.128.STRONG.SYS desc[UR4][R6.64], R8")
    p2p = _sass("LDG.E.128 R4, desc[UR4][R2.64]", "STG.E.128 desc[UR4][R6.64], R8")
    assert ck.transport_problems("f", mc, "Multimem", "resident", True) == []
    assert ck.transport_problems("f", p2p, "Multimem", "resident", True)  # multimem build without multicast
    assert ck.transport_problems("f", mc, "P2P", "resident", True)  # p2p build with multimem instructions
    assert ck.transport_problems("f", p2p, "P2P", "resident", True) == []


def test_an_eight_byte_piece_kernel_must_load_after_the_grid_dependency_wait():
    name = "_ZN10tokenweave25add_rmsnorm_pieces_kernelI13__nv_bfloat16Li512ELi4ELi2ELi3EEEvNS_7RowArgsEPK5uint2PS3_S6_l"
    after = _sass("ACQBULK", "LDG.E.EL.64 R8, desc[UR4][R8.64]", "LDG.E.EF.64 R8, desc[UR4][R8.64]")
    before = _sass("LDG.E.EL.64 R8, desc[UR4][R8.64]", "ACQBULK", "LDG.E.EF.64 R8, desc[UR4][R8.64]")
    sixteen = _sass("ACQBULK", "LDG.E.128 R8, desc[UR4][R8.64]")
    assert ck.narrow_load_problems(name, after) == []
    assert ck.narrow_load_problems(name, before) == [f"{name}: a global load before griddepcontrol.wait (ACQBULK)"]
    assert ck.narrow_load_problems(name, sixteen) == [f"{name}: no 8-byte loads, the width it exists for"]


def test_an_exact_piece_kernel_must_issue_a_rows_loads_before_reading_one():
    """kExact kernels (launch.cu): a first-pass load read before the last one is issued makes the warp wait a memory
    latency in between (the SASS of the in-order shape 25 at 5674140); overwriting a register is not reading it."""
    name = "_ZN10tokenweave25add_rmsnorm_pieces_kernelI13__nv_bfloat16Li512ELi2ELi3ELi4ELb1EEEvNS_7RowArgsEPK5uint2PS3_S6_l"
    head = ("ACQBULK", "LDG.E.EL.64 R8, desc[UR4][R2.64]", "LDG.E.EL.64 R14, desc[UR4][R6.64]")
    tail = ("LDG.E.EL.64 R10, desc[UR4][R2.64+0x1000]", "LDG.E.EL.64 R12, desc[UR4][R6.64+0x1000]",
            "PRMT R20, R14, 0x7632, R20", "SHFL.BFLY PT, R0, R21, 0x10, 0x1f")
    assert ck.narrow_load_problems(name, _sass(*head, *tail)) == []
    waits = _sass(*head, "PRMT R20, R15, 0x7632, R20", *tail)
    assert ck.narrow_load_problems(name, waits) == [
        f"{name}: the load into R15 is read (PRMT R20, R15, 0x7632, R20) before the last first-pass load is issued"]
    assert ck.narrow_load_problems(name, _sass(*head, "IMAD.MOV.U32 R14, RZ, RZ, R3", "FADD R1, R14, R14", *tail)) == []
    general = name.replace("ELb1EE", "ELb0EE")  # guards between the loads: not checked (several code paths)
    assert ck.narrow_load_problems(general, waits) == []
