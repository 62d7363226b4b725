"""A stand-in torch.compile, in every Python process started with PYTHONPATH=tests/bad_compile and
GRAD_SCALE set: its compiled backward multiplies every gradient by GRAD_SCALE (0: the torch 2.11 fault;
0.5, -1: any other). A compiler that changes numbers without an error, for the compiled-against-uncompiled
checks of train.py, bench.py and dev/gpu_check.py (PYTHONPATH reaches torchrun's ranks and subprocesses)."""
import os

if "GRAD_SCALE" in os.environ:
    import torch
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    scale = float(os.environ["GRAD_SCALE"])

    def backward_compiler(graph, example_inputs):
        def run(args):
            outputs = graph(*args)
            return type(outputs)(o * scale if isinstance(o, torch.Tensor) and o.is_floating_point() else o
                                 for o in outputs)
        run._boxed_call = True
        return run

    wrong = aot_autograd(fw_compiler=lambda graph, example_inputs: make_boxed_func(graph),
                         bw_compiler=backward_compiler)
    compile = torch.compile
    torch.compile = lambda model=None, **options: compile(model, **{**options, "backend": wrong})
