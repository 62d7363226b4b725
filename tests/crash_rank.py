"""Runs train.py with rank 1 failing (for test_ddp.py), as CRASH says: 'step' (default), an exception in
its third optimizer step; 'write', the process dying in its first checkpoint write; 'disk_full', that
write failing as on a full disk."""
import os
import runpy
import sys

import torch

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, root)
crash = os.environ.get("CRASH", "step")
if os.environ.get("RANK") == "1" and crash == "step":
    original_step = torch.optim.AdamW.step
    calls = 0

    def failing_step(self, *args, **kwargs):
        global calls
        calls += 1
        if calls == 3:
            raise RuntimeError("injected failure")
        return original_step(self, *args, **kwargs)

    torch.optim.AdamW.step = failing_step
elif os.environ.get("RANK") == "1":
    import infra.checkpoint as checkpoint

    def failing_write(path, tensors):
        if crash == "disk_full":
            raise OSError(28, "No space left on device")
        os._exit(9)
    checkpoint._write_safetensors = failing_write
train_py = os.path.join(root, "train.py")
sys.argv = [train_py] + sys.argv[1:]
runpy.run_path(train_py, run_name="__main__")
