"""
The device a run trains on: which one ('auto', 'cpu', 'cuda[:N]') with which precision, its name
and its peak FLOP/s (for MFU), and the peak memory so far.
"""
from contextlib import nullcontext

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
    bf16 autocast on CUDA, fp32 on the CPU (bf16 is far slower on CPUs without bf16 units)."""
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
    return device, device_type, dtype, autocast


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
