"""Runs train.py with an exception injected into rank 1's third optimizer step (for test_ddp.py)."""
import os
import runpy
import sys

import torch

if os.environ.get("RANK") == "1":
    original_step = torch.optim.AdamW.step
    calls = 0

    def failing_step(self, *args, **kwargs):
        global calls
        calls += 1
        if calls == 3:
            raise RuntimeError("injected failure")
        return original_step(self, *args, **kwargs)

    torch.optim.AdamW.step = failing_step
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
train_py = os.path.join(root, "train.py")
sys.path.insert(0, root)
sys.argv = [train_py] + sys.argv[1:]
runpy.run_path(train_py, run_name="__main__")
