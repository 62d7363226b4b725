"""
The GPU check's kernel parts (dev/gpu_check.py's parts 1 and 2, and nothing else imports this): single
kernels timed in this process, at the 1B model's shapes.
    ceilings(...)    a large matmul's TFLOP/s, a copy's GB/s, and the block's q/k/v and gate/up
                     projections as one matmul against several (what fusing them would gain)
    attention(...)   forward + backward per SDPA backend, compared with the math backend in fp32
Each returns the part's record with its "lines" to print. dry_run (the CPU): fp32 and few repeats.
"""
import time

import torch

from model import ModelArgs


def timed(function, repeats, *, dry_run):
    """Seconds per call of function, after one call to warm it up."""
    function()
    if not dry_run:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        function()
    if not dry_run:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def ceilings(*, device, dry_run, shape, micro):
    """A large matmul's TFLOP/s, a copy's GB/s, and what fusing the blocks' projections would gain."""
    n = 1024 if dry_run else 8192
    a = torch.randn(n, n, device=device, dtype=torch.float32 if dry_run else torch.bfloat16)
    b = torch.randn_like(a)
    matmul = 2 * n**3 / timed(lambda: a @ b, 3 if dry_run else 50, dry_run=dry_run) / 1e12
    src = torch.empty(2**24 if dry_run else 2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy = 2 * src.numel() / timed(lambda: dst.copy_(src), 3 if dry_run else 20, dry_run=dry_run) / 1e9  # read + write
    # fused projections (a candidate): the 1B block's q, k, v (and gate, up) as one matmul or as several
    tokens, width, hidden = micro * shape["block_size"], shape["n_embd"], ModelArgs(**shape).mlp_hidden_dim
    kv = width // shape["n_head"] * shape["n_kv_head"]
    x = torch.randn(tokens, width, device=device, dtype=a.dtype)
    fusion = {}
    for name, rows in (("qkv", [width, kv, kv]), ("gate_up", [hidden, hidden])):
        w = torch.randn(sum(rows), width, device=device, dtype=a.dtype)
        parts = list(w.split(rows))
        split_s = timed(lambda: [x @ p.t() for p in parts], 2 if dry_run else 20, dry_run=dry_run)
        fusion[name] = split_s / timed(lambda: x @ w.t(), 2 if dry_run else 20, dry_run=dry_run) - 1
    return {"matmul_tflops": matmul, "copy_gb_per_s": copy, "fused_speedup": fusion,
            "lines": [f"matmul {matmul:.1f} TFLOP/s ({'fp32' if dry_run else 'bf16'}, {n}^3), copy {copy:.0f} GB/s",
                      "one fused matmul against the split ones at the 1B block's shapes: "
                      + ", ".join(f"{k} {100 * v:+.1f}%" for k, v in fusion.items())]}


def attention(*, device, dry_run, shape, micro):
    """Forward + backward at shape per SDPA backend, timed, and compared with the math backend in
    fp32: the error of the output and of each input's gradient, relative to the largest value."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads, kv_heads, length = shape["n_head"], shape["n_kv_head"], shape["block_size"]
    head_dim = shape["n_embd"] // heads
    dtype = torch.float32 if dry_run else torch.bfloat16
    flops = 3.5 * 4 * micro * heads * length**2 * head_dim / 2  # causal forward (QK^T, AV) and a 2.5x backward
    r, lines = {}, []
    # the config's heads (grouped-query, and with K/V expanded), and half as many of twice the size (a candidate)
    for variant, q, kv, dim in (("gqa", heads, kv_heads, head_dim), ("expanded", heads, heads, head_dim),
                                ("gqa_head_dim_128", heads // 2, kv_heads // 2, 2 * head_dim)):
        inputs = [torch.randn(micro, n, length, dim, device=device, dtype=dtype, requires_grad=True)
                  for n in (q, kv, kv)]
        grad_out = torch.randn(micro, q, length, dim, device=device, dtype=dtype)

        def step(tensors):
            for t in tensors:
                t.grad = None
            out = torch.nn.functional.scaled_dot_product_attention(*tensors, is_causal=True, enable_gqa=kv < q)
            out.backward(grad_out.to(out.dtype))
            return [out.detach()] + [t.grad for t in tensors]

        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # a true fp32 reference
        try:
            with sdpa_kernel([SDPBackend.MATH]):
                reference = step([t.detach().float().requires_grad_() for t in inputs])
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
            try:
                with sdpa_kernel([getattr(SDPBackend, backend)]):
                    got = step(inputs)  # whether the backend takes this input at all, and the values
                    seconds = timed(lambda: step(inputs), 2 if dry_run else 10, dry_run=dry_run)
                errors = {name: ((g.float() - e).abs().max() / e.abs().max()).item()
                          for name, g, e in zip(("out", "dq", "dk", "dv"), got, reference)}
                r[f"{backend}/{variant}"] = {"ms": 1000 * seconds, "tflops": flops / seconds / 1e12,
                                             "error_vs_math_fp32": errors}
                lines.append(f"{backend.lower()} {variant}: {flops / seconds / 1e12:.1f} TFLOP/s "
                             f"({1000 * seconds:.2f} ms); vs fp32 math: "
                             + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
            except RuntimeError as e:
                r[f"{backend}/{variant}"] = {"error": str(e).splitlines()[0][:200]}
                lines.append(f"{backend.lower()} {variant}: does not run here ({str(e).splitlines()[0][:80]})")
    r["lines"] = lines + ["the one training uses: the smoke part's attention kernels"]
    return r
