"""Spawn a process group for a test and collect every rank's result, with a hard time bound.

A rank that raises, hangs or dies fails the test; nothing here can hang the suite: after
``timeout`` seconds every worker still alive is killed and the test fails naming it.
"""
from __future__ import annotations

import os
import socket
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, backend, port, fn, args, queue, extra_env, exit_after):
    os.environ.update(extra_env)  # os.environ keeps the multicast-off variables of the parent
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch.distributed as dist

    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
            dist.init_process_group(backend, rank=rank, world_size=world, device_id=torch.device("cuda", rank))
        else:
            dist.init_process_group(backend, rank=rank, world_size=world)
        result = fn(rank, world, *args)
        queue.put((rank, "ok", result))
        if exit_after:  # a peer may be dead: tearing the process group down could block
            queue.close()
            queue.join_thread()
            os._exit(0)
    except BaseException as e:  # report everything, including timeouts raised by tokenweave
        queue.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def run_workers(fn, world: int, *args, backend: str = "gloo", timeout: float = 180.0, extra_env=None,
                allow_errors: bool = False, exit_after: bool = False):
    """Run ``fn(rank, world, *args)`` on ``world`` spawned ranks; return the list of results by rank.

    With ``allow_errors``, a rank's exception text is returned as ``("error", text)`` instead of failing.
    With ``exit_after``, ranks exit right after reporting (for tests where a peer died on purpose).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, backend, port, fn, args, queue, dict(extra_env or {}), exit_after),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    import queue as queue_mod
    import time

    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            rank, status, value = queue.get(timeout=min(left, 1.0))
        except queue_mod.Empty:
            if all(not p.is_alive() for p in procs) and queue.empty():
                break
            continue
        (results if status == "ok" else errors)[rank] = value
    for p in procs:
        p.join(timeout=max(0.0, min(10.0, deadline - time.monotonic())))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    missing = [r for r in range(world) if r not in results and r not in errors]
    if allow_errors:
        out = [results.get(r, ("error", errors.get(r, "no result (hung or died)"))) for r in range(world)]
        if hung:
            raise AssertionError(f"ranks {hung} still running after {timeout} s (killed)")
        return out
    if errors or missing:
        msg = "\n".join(f"rank {r}: {t}" for r, t in sorted(errors.items()))
        raise AssertionError(f"distributed test failed; ranks without result: {missing}, hung: {hung}\n{msg}")
    return [results[r] for r in range(world)]
