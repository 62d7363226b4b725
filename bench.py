"""
Benchmark a config's training step:
    python bench.py configs/pretrain.py configs/tiny.py
    python bench.py configs/pretrain.py --bench_steps=20      # on a GPU
1. the bare step: forward + backward of every micro-batch, then the optimizer step, on one fixed
   batch already on the device; timed on the device (CUDA events) after warmup_steps.
2. the full step: train.py itself on the config's data (batch loading, accumulation, clipping,
   the LR schedule, logging), run as a subprocess, its ms/step read back from metrics.jsonl.
3. the data loader: the host time to read one step's windows from the config's data (on a GPU it
   overlaps the device's work, so its share says how close the host comes to being the bottleneck).
Prints a table and a last line of JSON. loop_overhead = full / bare - 1.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

# train.py's config globals and defaults: everything above its configurator line
_train_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
exec(open(_train_py).read().split("exec(open(")[0])
warmup_steps = 5                # untimed steps first (torch.compile compiles here)
bench_steps = 10                # timed steps
full_step = True                # also time train.py's full step, for the loop overhead
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())

from model import GPT, ModelArgs, device_peak_flops, resolve_device

device, device_type, dtype, autocast = resolve_device(device, dtype)
if compile is None:
    compile = device_type == "cuda"
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
if vocab_size == 0:
    with open(os.path.join(data_dir, "meta.json")) as f:
        vocab_size = json.load(f)["vocab_size"]
grad_accum = batch_size // micro_batch_size  # one device; the batch-size schedule is not benchmarked

torch.manual_seed(seed)
with torch.device(device):
    raw_model = GPT(ModelArgs(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                              n_kv_head=n_kv_head, n_embd=n_embd, mlp_ratio=mlp_ratio, rope_base=rope_base,
                              qk_norm=qk_norm, tie_embeddings=tie_embeddings))
raw_model.checkpoint_blocks = activation_checkpointing
model = torch.compile(raw_model) if compile else raw_model
optimizers, optimizer_summary = raw_model.configure_optimizers(
    learning_rate, weight_decay, (beta1, beta2), use_muon, muon_lr, muon_weight_decay, muon_momentum)
for opt in optimizers:  # the divergence guard's flag, as train.py sets it: the optimizers' own code path
    opt.found_inf = torch.zeros((), device=device)
x = torch.randint(0, vocab_size, (micro_batch_size, block_size), device=device)
y = torch.randint(0, vocab_size, (micro_batch_size, block_size), device=device)


def forward_backward():
    for _ in range(grad_accum):
        with autocast:
            loss = model(x, y)
        (loss / grad_accum).backward()


def optimizer_step(index=None):
    for opt in optimizers if index is None else [optimizers[index]]:
        opt.step()


def bare_step():
    forward_backward()
    optimizer_step()
    raw_model.zero_grad(set_to_none=True)


def time_ms(function, steps):
    """Mean milliseconds per call: CUDA events on the GPU, the wall clock on the CPU."""
    if device_type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            function()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / steps
    started = time.perf_counter()
    for _ in range(steps):
        function()
    return 1000 * (time.perf_counter() - started) / steps


for _ in range(warmup_steps):
    bare_step()
if device_type == "cuda":
    torch.cuda.reset_peak_memory_stats()
bare_ms = time_ms(bare_step, bench_steps)
if device_type == "cuda":
    peak_memory_mb = torch.cuda.max_memory_allocated() / 2**20
else:
    import resource
    peak_memory_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
# each optimizer's step on its own, on the gradients of one more forward/backward
forward_backward()
optimizer_ms = [time_ms(lambda: optimizer_step(i), bench_steps) for i in range(len(optimizers))]
raw_model.zero_grad(set_to_none=True)

tokens_per_step = batch_size * block_size
flops_per_token = raw_model.flops_per_token()
peak = peak_flops or device_peak_flops(device_type)
result = {
    "device": torch.cuda.get_device_name() if device_type == "cuda" else "cpu",
    "dtype": dtype, "compile": compile, "activation_checkpointing": activation_checkpointing,
    "params": raw_model.num_params(), "tokens_per_step": tokens_per_step,
    "ms_per_step": bare_ms, "tokens_per_s": tokens_per_step / bare_ms * 1000,
    "model_flops_per_s": flops_per_token * tokens_per_step / bare_ms * 1000,
    "mfu": flops_per_token * tokens_per_step / bare_ms * 1000 / peak if peak else None,
    "peak_memory_mb": peak_memory_mb,
    "adamw_step_ms": optimizer_ms[0], "muon_step_ms": optimizer_ms[1] if use_muon else None,
    "optimizer_share": sum(optimizer_ms) / bare_ms,
    "forward_backward_ms_per_micro_batch": (bare_ms - sum(optimizer_ms)) / grad_accum,
}
del model, raw_model, optimizers  # free the device for train.py

if full_step:
    # train.py on the same config; logging once per warmup and once per timed interval keeps its
    # host syncs as rare as in a real run
    # its warmup rounded up to whole log intervals, so its last record times exactly the bench_steps
    train_warmup = -(-warmup_steps // bench_steps) * bench_steps
    with tempfile.TemporaryDirectory() as out:
        args = [a for a in sys.argv[1:] if not a.startswith(("--warmup_steps", "--bench_steps", "--full_step"))]
        overrides = [f"--out_dir={out}/run", f"--max_iters={train_warmup + bench_steps}", f"--log_interval={bench_steps}",
                     f"--eval_interval={10 * (train_warmup + bench_steps)}", "--eval_iters=0", "--init_from=scratch",
                     "--batch_size_schedule=None", f"--warmup_iters={min(warmup_iters, train_warmup + bench_steps)}"]
        run = subprocess.run([sys.executable, _train_py, *args, *overrides], capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"bench.py: train.py failed:\n{run.stderr[-3000:]}")
        with open(f"{out}/run/metrics.jsonl") as f:
            records = [json.loads(line) for line in f if '"ms_per_step"' in line]
    result["full_ms_per_step"] = records[-1]["ms_per_step"]
    result["loop_overhead"] = result["full_ms_per_step"] / bare_ms - 1

# the host's share: reading one step's windows (train.py does this while the device computes)
if os.path.exists(os.path.join(data_dir, "meta.json")):
    from data import open_dataset, read_windows, sample_windows
    datasets = [open_dataset(data_dir, block_size)]
    started = time.perf_counter()
    for step in range(bench_steps):
        windows = sample_windows(datasets, [1.0], "train", batch_size, (seed, step))
        for k in range(0, batch_size, micro_batch_size):
            read_windows(datasets, "train", windows[k:k + micro_batch_size], block_size, False)
    result["data_ms_per_step"] = 1000 * (time.perf_counter() - started) / bench_steps
    result["data_share"] = result["data_ms_per_step"] / bare_ms

rows = [("device", result["device"]), ("dtype / compile", f"{dtype} / {compile}"),
        ("parameters", f"{result['params'] / 1e6:.2f}M"), ("tokens per step", f"{tokens_per_step:,}"),
        ("bare step", f"{bare_ms:.1f} ms"), ("tokens/s", f"{result['tokens_per_s']:,.0f}"),
        ("model TFLOP/s", f"{result['model_flops_per_s'] / 1e12:.3f}"),
        ("MFU", f"{100 * result['mfu']:.1f}%" if result["mfu"] else "n/a (unknown peak; set --peak_flops)"),
        ("peak memory", f"{peak_memory_mb:,.0f} MB"), ("AdamW step", f"{optimizer_ms[0]:.2f} ms")]
if use_muon:
    rows.append(("Muon step", f"{optimizer_ms[1]:.2f} ms"))
rows.append(("optimizer share", f"{100 * result['optimizer_share']:.1f}% of the bare step"))
if "data_share" in result:
    rows.append(("data loader", f"{result['data_ms_per_step']:.2f} ms/step on the host ({100 * result['data_share']:.1f}%)"))
if full_step:
    rows += [("train.py step", f"{result['full_ms_per_step']:.1f} ms"), ("loop overhead", f"{100 * result['loop_overhead']:+.1f}%")]
for name, value in rows:
    print(f"{name:>16}  {value}")
print(json.dumps(result))
