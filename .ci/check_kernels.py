"""Compile every CUDA kernel for sm_90a (CMake, torch-free) and check the SASS.

The multimem kernels cannot run on our GPU hosts (multicast is forbidden there), so this is their
check: every multimem instantiation must contain the multicast reduce-load (LDGMC) and the
multicast store (multimem.st assembles to STG.E.128.STRONG.SYS on the multicast address), and the
P2P instantiations must contain neither. Needs nvcc, cmake, cuobjdump and nvdisasm
(PyPI: nvidia-cuda-cuobjdump, nvidia-cuda-nvdisasm). Exit 0 = checked and fine.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FEEDS = ("resident", "tracked", "copy_engine")  # enum class Feed in csrc/include/tokenweave/types.h


def find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    try:
        import nvidia

        for base in nvidia.__path__:
            for p in Path(base).glob(f"*/bin/{name}"):
                return str(p)
    except ImportError:
        pass
    return None


POLLS = r"LDG\.E\.128\.STRONG\.SYS|LD\.E\.128\.STRONG\.SYS|LDG\.E\.128\.VOLATILE"
# Kernels of their own (kernel name -> the kind counted, whether its multimem build reduces through the switch
# (LDGMC), and the SASS it must contain with why). The Lamport kernels push with the transport but poll their own
# buffers with volatile 16-byte loads; lean_bulk's copy warp moves the scatter with bulk copies; lean_pull's multimem
# build reduces every rank's x through the switch (LDGMC) and stores through the multicast address.
OWN_KERNELS = {
    "lamport_kernel": ("lamport", False, [(POLLS, "volatile 16-byte polls of the Lamport buffer")]),
    "lamport_two_shot_kernel": ("lamport_two_shot", False, [(POLLS, "volatile 16-byte polls of the Lamport buffers")]),
    "lean_kernel": ("lean", True, []),
    "lean_pull_kernel": ("lean_pull", True, []),
    "lean_bulk_kernel": ("lean_bulk", True, [(r"UBLKCP\.S\.G", "bulk loads (UBLKCP.S.G)"),
                                             (r"UBLKCP\.G\.S", "bulk stores (UBLKCP.G.S)")]),
}


def transport_problems(fn: str, sass: str, transport: str, what: str, needs_ld_reduce: bool) -> list[str]:
    """Multimem builds must use the multicast store (and the switch's reduce-load where the algorithm reduces
    through it); p2p builds neither (multimem.st assembles to STG.E.128.STRONG.SYS on the multicast address)."""
    has_ld_reduce, has_mc_store = "LDGMC" in sass, "STG.E.128.STRONG.SYS" in sass
    if transport == "Multimem" and not (has_mc_store and (has_ld_reduce or not needs_ld_reduce)):
        return [f"{fn}: multimem {what} kernel without " + ("LDGMC/multicast store" if needs_ld_reduce else
                                                            "the multicast store")]
    if transport == "P2P" and (has_ld_reduce or has_mc_store):
        return [f"{fn}: P2P {what} kernel contains multimem instructions"]
    return []


def sass_by_function(cuobjdump: str, obj: Path) -> dict[str, str]:
    env = dict(os.environ)
    nvdisasm = find_tool("nvdisasm")
    if nvdisasm:
        env["PATH"] = str(Path(nvdisasm).parent) + os.pathsep + env.get("PATH", "")
    text = subprocess.run([cuobjdump, "--dump-sass", str(obj)], capture_output=True, text=True, check=True,
                          env=env).stdout
    parts = re.split(r"\n\s*Function : (\S+)\n", text)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


# Global loads narrower than 16 bytes. The data path moves 16-byte vectors only; what is left are a kernel's few
# state words (a call counter, a slot header, a ready flag). A data vector read through a reference compiled to
# four 4-byte loads for the 2-byte types (Pack::unpack, common.cuh): 16-115 per kernel before that fix.
# Flag polls (.STRONG) are excluded: they are narrow by design.
NARROW_LOADS = re.compile(r"\bLDG\.E(?:\.(?:U8|S8|U16|S16|64|CONSTANT))* ")
MAX_NARROW_LOADS = 8
# Kernels that move 8-byte pieces by design (launch.cu: the add + RMSNorm shape that reads as the compiled norm does)
EIGHT_BYTE_KERNELS = re.compile(r"add_rmsnorm_pieces_kernel")


def narrow_load_problems(fn: str, sass: str) -> list[str]:
    if EIGHT_BYTE_KERNELS.search(fn):
        problems = [] if re.search(r"\bLDG\.E(?:\.E[LF])?\.64 ", sass) else [f"{fn}: no 8-byte loads, the width it exists for"]
        # its hinted loads are asm without volatile (launch.cu load_piece_hinted): the compiler could move one above
        # griddepcontrol.wait, and under PDL read x before the kernel that writes it is done
        first_load, wait = re.search(r"\bLDG\b", sass), re.search(r"\bACQBULK\b", sass)
        if first_load and wait and first_load.start() < wait.start():
            problems.append(f"{fn}: a global load before griddepcontrol.wait (ACQBULK)")
        # kExact, the last template argument (mangled "Lb1EE" before the parameters): every load of a row in
        # flight before the first use of one
        if re.search(r"ELb1EE", fn):
            problems += [f"{fn}: {p}" for p in loads_waited_on(sass)]
        return problems
    n = len(NARROW_LOADS.findall(sass))
    return [f"{fn}: {n} global loads narrower than 16 bytes (at most {MAX_NARROW_LOADS}: state words only)"] \
        if n > MAX_NARROW_LOADS else []


def loads_waited_on(sass: str) -> list[str]:
    """Loads of the first pass (before the first shuffle of the reduction) that an instruction reads before the
    last of them is issued: the warp then waits one memory latency before issuing the rest (launch.cu kExact: the
    in-order shape 25 lost 15% that way at 16384 x 4096)."""
    body = [re.sub(r"/\*.*?\*/", "", line).strip().rstrip(" ;") for line in sass.splitlines()]
    body = [b for b in body if b and not b.startswith(".")]
    end = next((i for i, b in enumerate(body) if "SHFL" in b), len(body))
    loads = [i for i in range(end) if re.search(r"\bLDG\b", body[i])]
    if not loads:
        return []
    problems, pending = [], {}
    for i in range(loads[0], loads[-1] + 1):
        predicate = re.match(r"^@!?U?P(?:\d+|T)\s+", body[i])
        op, _, args = body[i][predicate.end() if predicate else 0:].partition(" ")
        operands = [a.strip() for a in args.split(",")]
        reads = " ".join(operands if op.startswith(("ST", "RED", "ATOM")) else operands[1:])
        for reg in [r for r in pending if re.search(rf"\bR{r}\b", reads)]:
            problems.append(f"the load into R{reg} is read ({body[i]}) before the last first-pass load is issued")
            del pending[reg]
        written = re.match(r"R(\d+)", operands[0]) if not op.startswith(("ST", "RED", "ATOM")) else None
        if written and not predicate:  # overwritten before any read: that load's value is gone, nothing waits on it
            first = int(written.group(1))
            for reg in (first, first + 1) if re.search(r"\.(?:WIDE|64)\b", op) else (first,):
                pending.pop(reg, None)
        if re.search(r"\bLDG\b", op):
            first = int(re.match(r"R(\d+)", operands[0]).group(1))
            pending.update({first: i, first + 1: i})  # an 8-byte load fills a register pair
    return problems


def main() -> int:
    build = ROOT / "build" / "kernels"
    nvcc, cuobjdump = find_tool("nvcc"), find_tool("cuobjdump")
    if not nvcc or not cuobjdump or not shutil.which("cmake"):
        print(f"check_kernels: missing tools (nvcc={nvcc}, cuobjdump={cuobjdump}, cmake={shutil.which('cmake')})")
        return 1
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), f"-DCMAKE_CUDA_COMPILER={os.path.realpath(nvcc)}"],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), f"-j{os.cpu_count() or 2}"], check=True, stdout=subprocess.DEVNULL)
    objs = {p.name: p for p in build.rglob("*.cu.o")}
    problems, counted = [], {}
    for name, obj in sorted(objs.items()):
        for fn, sass in sass_by_function(cuobjdump, obj).items():
            transport = "Multimem" if "Multimem" in fn else "P2P"
            own = next((k for k in OWN_KERNELS if re.search(rf"\d{k}I", fn)), None)  # mangled: <len><name>I
            # griddepcontrol.wait assembles to ACQBULK: without it a kernel launched with PDL (pdl.cuh)
            # could read x before the kernel that writes it has finished
            if (own or re.search(r"allreduce_kernel|add_rmsnorm", fn)) and "ACQBULK" not in sass:
                problems.append(f"{fn}: no griddepcontrol.wait (ACQBULK): unsafe under programmatic launch")
            if own or re.search(r"allreduce_kernel|add_rmsnorm", fn):
                problems += narrow_load_problems(fn, sass)
            if own is not None:  # the algorithms with a kernel of their own
                kind, needs_ld_reduce, required = OWN_KERNELS[own]
                counted[(transport, kind)] = counted.get((transport, kind), 0) + 1
                problems += transport_problems(fn, sass, transport, kind, needs_ld_reduce)
                problems += [f"{fn}: no {why}" for pattern, why in required if not re.search(pattern, sass)]
                continue
            if "allreduce_kernel" not in fn:
                continue
            feed = FEEDS[int(re.search(r"FeedE(\d)E", fn).group(1))]  # the kFeed template argument
            counted[(transport, feed)] = counted.get((transport, feed), 0) + 1
            if feed == "tracked" and "LDG.E.STRONG.GPU" not in sass:
                problems.append(f"{fn}: tracked kernel without the gpu-scope acquire of its ready counters")
            if feed == "copy_engine" and "ST.E.STRONG.SYS" not in sass and "STG.E.STRONG.SYS" not in sass:
                problems.append(f"{fn}: copy-engine kernel without the system-scope release of its handshake word")
            problems += transport_problems(fn, sass, transport, feed, needs_ld_reduce=True)
            if not re.search(r"LDG\.E\.128", sass):
                problems.append(f"{fn}: no 16-byte loads")
    print("check_kernels: all-reduce kernels disassembled from", len(objs), "objects:",
          ", ".join(f"{n} {t.lower()} {k}" for (t, k), n in sorted(counted.items())))
    for p in problems:
        print("  PROBLEM:", p)
    # resident: 3 dtypes x world sizes 2..8; tracked (track-and-trigger): bf16, fp16 x 2..8; the copy-engine
    # feed writes peers' unicast slots, so it exists for p2p only
    # Lamport (one-shot and two-shot): bf16, fp16 x 2..8 (its sentinel is a 2-byte -0.0), both transports
    expected = {("Multimem", "resident"): 21, ("P2P", "resident"): 21, ("Multimem", "tracked"): 14,
                ("P2P", "tracked"): 14, ("P2P", "copy_engine"): 14, ("Multimem", "lamport"): 14, ("P2P", "lamport"): 14,
                ("Multimem", "lamport_two_shot"): 14, ("P2P", "lamport_two_shot"): 14,
                ("Multimem", "lean"): 21, ("P2P", "lean"): 21,  # lean: 3 dtypes x 2..8, resident only
                ("Multimem", "lean_pull"): 21, ("P2P", "lean_pull"): 21,
                ("Multimem", "lean_bulk"): 21, ("P2P", "lean_bulk"): 21}
    if counted != expected:
        print(f"  PROBLEM: expected {expected}")
        return 1
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
