"""Runs each add_rmsnorm validation case of tests/gpu/test_ops_gpu.py in its own process: which one crashes."""
import subprocess
import sys

PRE = ("import torch, tokenweave as tw; x = torch.randn(4, 64, dtype=torch.bfloat16, device='cuda'); "
       "res, w = torch.randn_like(x), torch.ones(64, dtype=torch.bfloat16, device='cuda'); ")
CASES = {
    "dtype": "tw.add_rmsnorm(x, res, w.float())",
    "hidden%8 no residual": "tw.add_rmsnorm(x[:, :60].contiguous(), None, w[:60].contiguous())",
    "hidden%8 with residual": "tw.add_rmsnorm(x[:, :60].contiguous(), res[:, :60].contiguous(), w[:60].contiguous())",
    "ok no residual": "tw.add_rmsnorm(x, None, w)",
    "direct op hidden%8": "torch.ops.tokenweave.add_rmsnorm.default(x[:, :60].contiguous(), None, w[:60].contiguous(), "
                          "torch.empty(4, 60, dtype=torch.bfloat16, device='cuda'), 1e-6)",
    "direct op hidden%8 residual": "torch.ops.tokenweave.add_rmsnorm.default(x[:, :60].contiguous(), res[:, :60].contiguous(), "
                                   "w[:60].contiguous(), torch.empty(4, 60, dtype=torch.bfloat16, device='cuda'), 1e-6)",
    "shape": "tw.add_rmsnorm(x, res, w[:32])",
    "transposed": "tw.add_rmsnorm(torch.randn(64, 16, dtype=torch.bfloat16, device='cuda').t(), None, w)",
}
for name, call in CASES.items():
    p = subprocess.run([sys.executable, "-X", "faulthandler", "-c", PRE + f"\ntry:\n    {call}\n    print('no error')\n"
                        "except Exception as e:\n    print(type(e).__name__, str(e)[:160])"],
                       capture_output=True, text=True, timeout=120)
    print(f"{name:>28}: rc={p.returncode} {p.stdout.strip()[-200:]} {p.stderr.strip()[-300:] if p.returncode else ''}")
