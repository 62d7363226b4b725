"""
FP8 matmuls for the transformer blocks' linear layers (train.py's fp8 setting): each of a linear
layer's three matmuls (the output, the input's gradient, the weight's gradient) runs on float8
operands through torch._scaled_mm, twice the bf16 tensor-core rate on an H100.

Scaling is tensorwise and dynamic: before each matmul, each operand is divided by one scale (its
largest magnitude over the format's largest value) so that it fills the float8 range, and
_scaled_mm multiplies the scales back. Activations and weights use float8_e4m3fn (more precision),
gradients float8_e5m2 (more range). The weights themselves stay as they were (fp32 master weights,
bf16 copies under FSDP2): only the matmuls' operands are quantized, so checkpoints and the export
are the same with fp8 on or off. The embedding, the output head and attention's softmax stay in
bf16: the head's logits are what the loss is most sensitive to.

Needs a GPU of compute capability 8.9 or later (Ada, Hopper, Blackwell); the CPU runs the same
arithmetic (slowly), which is how the tests check its numerics.
"""
import torch
import torch.nn as nn

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
MULTIPLE = 16  # _scaled_mm on CUDA wants every dimension of its operands a multiple of 16


def quantize(x, dtype):
    """(x scaled into dtype's range and cast, the scale that multiplies it back): one scale per tensor.
    The division is done in float64 so that compiled and eager code round the scale alike."""
    largest = torch.finfo(dtype).max
    amax = x.detach().abs().amax().double().clamp(min=1e-12)
    scale = (amax / largest).float()
    return (x.float() / scale).clamp(-largest, largest).to(dtype), scale


class _Float8Matmul(torch.autograd.Function):
    """x (N, K) @ weight.T (K, M) with all three matmuls in float8. _scaled_mm wants its first operand
    row-major and its second column-major: weight.t() of a row-major weight already is."""

    @staticmethod
    def forward(ctx, x, weight, out_dtype):
        x8, x_scale = quantize(x, E4M3)
        w8, w_scale = quantize(weight, E4M3)
        ctx.save_for_backward(x8, x_scale, w8, w_scale)
        ctx.dtypes = x.dtype, weight.dtype
        # fast accumulation in the forward only, as torchao does: the gradients keep full accumulation
        return torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=out_dtype, use_fast_accum=True)

    @staticmethod
    def backward(ctx, grad):
        x8, x_scale, w8, w_scale = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        g8, g_scale = quantize(grad, E5M2)
        # grad (N, M) @ weight (M, K): the weight made column-major
        grad_x = torch._scaled_mm(g8, w8.t().contiguous().t(), scale_a=g_scale, scale_b=w_scale, out_dtype=x_dtype)
        # grad.T (M, N) @ x (N, K): grad.T made row-major, x column-major
        grad_w = torch._scaled_mm(g8.t().contiguous(), x8.t().contiguous().t(), scale_a=g_scale, scale_b=x_scale,
                                  out_dtype=w_dtype)
        return grad_x, grad_w, None


class Float8Linear(nn.Linear):
    """nn.Linear (no bias) whose matmuls run in float8; the same parameter, so the same state dict."""

    def forward(self, x):
        device = x.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):  # the operands are quantized here, not cast by autocast
            y = _Float8Matmul.apply(x.reshape(-1, x.size(-1)), self.weight, out_dtype)
        return y.view(*x.shape[:-1], y.size(-1))


def problem(model, device):
    """Why fp8 cannot run on this model and device, as a sentence, or None."""
    if torch.device(device).type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return f"float8 matmuls need a GPU of compute capability 8.9 or later, not {torch.cuda.get_device_name(device)}"
    shapes = {tuple(m.weight.shape) for m in model.layers.modules() if isinstance(m, nn.Linear)}
    odd = sorted(s for s in shapes if s[0] % MULTIPLE or s[1] % MULTIPLE)
    if odd:
        return f"every block matrix's dimensions must be multiples of {MULTIPLE}; these are not: {odd}"
    return None


def use_fp8(model):
    """The blocks' linear layers of a GPT made Float8Linear in place (the parameters kept: call it on the
    meta device before parallel.wrap, or on a built model)."""
    for module in model.layers.modules():
        for name, child in module.named_children():
            if type(child) is nn.Linear:
                child.__class__ = Float8Linear
    return model
