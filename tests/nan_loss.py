"""Runs train.py with the training loss made NaN on chosen micro-steps (for test_resume.py):
NAN_CALLS="5,6" for training forward calls 5 and 6 (counted from 1), NAN_FROM=5 for every call from 5 on;
ZERO_GRAD=1 keeps the loss's value and makes every gradient exactly zero instead (a compiler fault's signature)."""
import os
import runpy
import sys

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, root)
import model  # noqa: E402

nan_calls = {int(c) for c in os.environ.get("NAN_CALLS", "").split(",") if c}
nan_from = int(os.environ.get("NAN_FROM", "0")) or None
zero_grad = os.environ.get("ZERO_GRAD") == "1"
original_forward = model.GPT.forward
calls = 0


def forward(self, idx, targets=None, loss_reduction="mean", cache=None):
    global calls
    out = original_forward(self, idx, targets, loss_reduction, cache)
    if targets is not None and loss_reduction != "none":  # a training micro-step, not evaluation
        calls += 1
        if calls in nan_calls or (nan_from is not None and calls >= nan_from):
            out = out.detach() + 0 * out if zero_grad else out * float("nan")
    return out


model.GPT.forward = forward
sys.argv = [os.path.join(root, "train.py")] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
