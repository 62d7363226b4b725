"""Runs train.py with Muon's Newton-Schulz in float32 (muon.NS_DTYPE): runs that sum the same
gradients in another order then agree to fp32 rounding, not bf16's (for test_fsdp.py)."""
import os
import runpy
import sys

import torch

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, root)
import muon  # noqa: E402

muon.NS_DTYPE = torch.float32
sys.argv = [os.path.join(root, "train.py")] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
