"""bench/device_run.sh refuses a multi-GPU run unless the host's multicast blockers are all in force (a fake
nvidia-smi stands in for the GPUs; nothing is built or run)."""
import os
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCKERS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _run(tmp_path, gpus, blockers):
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    smi = fake / "nvidia-smi"
    lines = "\\n".join(f"GPU {i}: NVIDIA H200" for i in range(gpus))
    smi.write_text(f'#!/bin/sh\nif [ "$1" = "-L" ]; then printf "{lines}\\n"; else echo "NVIDIA H200"; fi\n')
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ)  # a copy: the blockers of this process are never changed
    for k in BLOCKERS:
        env.pop(k, None)
    env.update(blockers)
    env.update(PATH=f"{fake}{os.pathsep}{env['PATH']}", OUT=str(tmp_path / "out"))
    # "nostage" matches no stage: past the guard the script does nothing
    return subprocess.run(["bash", "bench/device_run.sh", "nostage"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("missing", sorted(BLOCKERS))
def test_multi_gpu_run_refused_without_every_blocker(tmp_path, missing):
    r = _run(tmp_path, 4, {k: v for k, v in BLOCKERS.items() if k != missing})
    assert r.returncode == 3 and "REFUSED" in r.stdout, r.stdout + r.stderr


def test_multi_gpu_run_with_blockers_and_one_gpu_without_them_go_ahead(tmp_path):
    for gpus, blockers in ((4, BLOCKERS), (1, {})):
        r = _run(tmp_path, gpus, blockers)
        assert "REFUSED" not in r.stdout, r.stdout + r.stderr
        assert f"GPUs: {gpus}" in r.stdout
