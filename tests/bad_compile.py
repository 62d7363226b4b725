"""Runs train.py (or bench.py: BAD_COMPILE_SCRIPT) with a stand-in torch.compile whose compiled backward
multiplies every gradient by GRAD_SCALE (0: the torch 2.11 fault; 0.5, -1: any other): a compiler that
changes numbers without an error, for the compiled-against-eager check."""
import os
import runpy
import sys

import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

scale = float(os.environ.get("GRAD_SCALE", "0"))


def forward_compiler(graph, example_inputs):
    return make_boxed_func(graph)


def backward_compiler(graph, example_inputs):
    def run(args):
        outputs = graph(*args)
        return type(outputs)(o * scale if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in outputs)
    run._boxed_call = True
    return run


wrong_backend = aot_autograd(fw_compiler=forward_compiler, bw_compiler=backward_compiler)
compile = torch.compile
torch.compile = lambda model=None, **options: compile(model, **{**options, "backend": wrong_backend})
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, root)
sys.argv = [os.path.join(root, os.environ.get("BAD_COMPILE_SCRIPT", "train.py"))] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
