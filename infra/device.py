"""
The device a run trains on: which one ('auto', 'cpu', 'cuda[:N]') with which precision, whether
torch.compile can build code on this machine, its name and peak FLOP/s (for MFU), and the peak memory so far.
"""
from contextlib import nullcontext
import os

import torch

# Dense bf16 peak FLOP/s (no sparsity) of the GPUs this is likely to run on, for MFU.
# Matched against torch.cuda.get_device_name(); first match wins, so more specific names come first.
PEAK_BF16_FLOPS = [
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),   # SXM
    ("H200", 989e12),
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A10G", 70e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
]


def resolve_device(device="auto", dtype="auto"):
    """(device, device_type, dtype, autocast context): 'auto' is CUDA when there is one, else the CPU;
    bf16 autocast on CUDA, fp32 on the CPU (bf16 is far slower on CPUs without bf16 units); TF32 on."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}, but torch sees no CUDA device here (a CPU build of torch, or no GPU): "
                         f"use --device=cpu, or 'auto'")
    if device_type == "cpu" and device != "cpu":
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" else "float32"
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"dtype must be 'auto', 'bfloat16' or 'float32', got {dtype!r}")
    autocast = torch.autocast(device_type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    torch.backends.cuda.matmul.allow_tf32 = True  # what runs in fp32 on CUDA uses TF32's tensor cores
    torch.backends.cudnn.allow_tf32 = True
    return device, device_type, dtype, autocast


def compiler_problem(device_type):
    """What torch.compile lacks on this machine, as a sentence, or None. It builds code at run time:
    on CUDA, Triton compiles its launcher with a C compiler against Python's headers; on the CPU,
    inductor compiles C++. Without them the first compiled step dies deep inside inductor."""
    import shutil
    import sysconfig
    if device_type == "cuda":
        names, variable, what = ("cc", "gcc", "clang"), "CC", "a C compiler"
    else:
        names, variable, what = ("g++", "c++", "clang++"), "CXX", "a C++ compiler"
    chosen = os.environ.get(variable) or None
    if not (shutil.which(chosen.split()[0]) if chosen else any(shutil.which(name) for name in names)):
        return f"{what} ({'$' + variable + '=' + chosen if chosen else ', '.join(names)}) on PATH: install gcc/g++"
    headers = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    if device_type == "cuda" and not os.path.exists(headers):
        return f"Python's headers ({headers}): install python3-dev"
    return None


def resolve_compile(compile, device_type):
    """(compile, problem): None means on for CUDA, off for the CPU; asked for on a machine that lacks
    what it needs (compiler_problem), off, with that problem to warn of (uncompiled is slower, not wrong)."""
    if compile is None:
        compile = device_type == "cuda"
    problem = compiler_problem(device_type) if compile else None
    return compile and problem is None, problem


def busy_cpu_warning(load=None, cores=None, threads=None):
    """A warning when the CPU's cores are already busy (the load average says so) and torch would start
    one thread per core anyway: its threads then wait on each other, several times slower than with the
    cores that are free. None when OMP_NUM_THREADS is set or torch runs one thread."""
    load = os.getloadavg()[0] if load is None else load
    cores = (os.cpu_count() or 1) if cores is None else cores
    threads = torch.get_num_threads() if threads is None else threads
    if "OMP_NUM_THREADS" in os.environ or threads == 1 or load < cores / 2:
        return None
    free = max(1, cores - round(load))
    return (f"warning: the load average is {load:.1f} on {cores} cores: other work holds them, and torch's {threads} "
            f"threads would wait on it (several times slower); run with OMP_NUM_THREADS={free}, the free cores")


def peak_memory_mb(device):
    """The peak memory so far: allocated on a GPU, the process's resident set on a CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def device_name(device_type):
    """The GPU's name, or the CPU's model and core count: what a run's numbers were measured on."""
    if device_type == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        model = platform.processor() or platform.machine()
    return f"{model}, {torch.get_num_threads()} threads"


def device_peak_flops(device_type):
    """Peak dense bf16 FLOP/s of the current CUDA device, or None when unknown (or on the CPU)."""
    if device_type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None
