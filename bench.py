"""
Benchmark a config's training step, or profile train.py's:
    python bench.py configs/pretrain.py configs/tiny.py
    python bench.py configs/pretrain.py --bench_steps=20      # on a GPU
    python bench.py configs/pretrain.py configs/tiny.py --profile=True --log_interval=3
The config files and every --key=value except bench.py's own settings (below, and --help) are
train.py's; bench.py asks train.py for the resulting config (train.py --print_config), so it
measures the model, batch and optimizers train.py would run.
1. the bare step: forward + backward of every micro-batch, then the optimizer step, on one fixed
   batch already on the device; timed on the device (CUDA events) after warmup_steps.
2. the full step: train.py itself on the config's data (batch loading, accumulation, clipping,
   the LR schedule, logging), run as a subprocess, its ms/step read back from metrics.jsonl.
3. the data loader: the host time to read one step's windows from the config's data (on a GPU it
   overlaps the device's work, so its share says how close the host comes to being the bottleneck).
Prints a table and a last line of JSON. loop_overhead = full / bare - 1.
With --profile=True instead: train.py runs in this process, from scratch in a temporary out_dir,
under torch.profiler, and stops once its 8th to 10th steps (after compilation and the first
allocations) are profiled. profile_dir gets trace.json (Perfetto, chrome://tracing), ops.txt (the
top ops) and summary.json: the host syncs counted (.item() and friends, CUDA synchronizations) and
the attention kernels the step ran. Each optimizer step marks a step for the profiler, through
torch's global optimizer hook: train.py needs no line for it.
"""
import ast
import json
import os
import runpy
import subprocess
import sys
import tempfile
import time

# ----------------------------------------------------------------------------------------------
warmup_steps = 5                # untimed steps first (torch.compile compiles here)
bench_steps = 10                # timed steps
full_step = True                # also time train.py's full step, for the loop overhead
profile = False                 # profile train.py's 8th to 10th steps instead of timing (see above)
profile_dir = "out/profile"     # where --profile=True writes
memory_cap_gb = 0.0             # cap this process's GPU memory (an H200 answering for an 80 GB H100); 0: none
# ----------------------------------------------------------------------------------------------
_own = tuple(
    f"--{name}=" for name in ("warmup_steps", "bench_steps", "full_step", "profile", "profile_dir", "memory_cap_gb")
)
_train_args = [a for a in sys.argv[1:] if not a.startswith(_own) and a not in ("--help", "-h", "--print_config")]
sys.argv = [sys.argv[0]] + [a for a in sys.argv[1:] if a not in _train_args]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
TRAIN, train_args = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"), _train_args

import torch  # noqa: E402  (after the config: --help answers without loading torch)
from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402

from data import ceil_div  # noqa: E402
from infra.device import device_peak_flops, resolve_compile, resolve_device  # noqa: E402
from fp8 import use_fp8  # noqa: E402
from model import GPT, ModelArgs  # noqa: E402
from muon import Muon  # noqa: E402
from infra.parallel import compiled_step_problem  # noqa: E402

printed = subprocess.run([sys.executable, TRAIN, *train_args, "--print_config"], capture_output=True, text=True)
if printed.returncode != 0:
    sys.exit(f"bench.py: {printed.stderr.strip()}")
train_config = {key: ast.literal_eval(value) for key, _, value in
                (line.partition(" = ") for line in printed.stdout.splitlines())}


# ---- --profile=True: train.py's own loop under the profiler -------------------------------------
def write_profile(profiler):
    """A Chrome trace, the top ops, and the host syncs counted: .item() and friends
    (aten::_local_scalar_dense) and explicit CUDA synchronizations."""
    os.makedirs(profile_dir, exist_ok=True)
    profiler.export_chrome_trace(os.path.join(profile_dir, "trace.json"))
    sort_by = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    with open(os.path.join(profile_dir, "ops.txt"), "w") as f:
        f.write(profiler.key_averages().table(sort_by=sort_by, row_limit=40))

    def inside_fused_adamw(event):  # its CPU kernel reads found_inf with .item(); the CUDA kernel, on the device
        while event is not None and event.name != "aten::_fused_adamw_":
            event = event.cpu_parent
        return event is not None

    events = profiler.events()
    summary = {
        "steps": [8, 9, 10],
        "item_calls": sum(e.name == "aten::_local_scalar_dense" and not inside_fused_adamw(e) for e in events),
        "cuda_syncs": sum(
            e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize") for e in events
        ),
        # the attention kernels the model really ran (flash, cuDNN, memory-efficient or math)
        "attention_ops": sorted(
            {
                e.name
                for e in events
                if e.name.startswith(("aten::_scaled_dot_product", "aten::_flash", "aten::_efficient", "aten::_cudnn"))
            }
        ),
    }
    with open(os.path.join(profile_dir, "summary.json"), "w") as f:
        json.dump(summary, f)
    print(f"profile of steps 8-10 in {profile_dir}: {summary['item_calls']} .item() calls, "
          f"{summary['cuda_syncs']} CUDA synchronizations, attention {summary['attention_ops']}", flush=True)
    raise ProfileDone  # out of train.py's loop: nothing more to run


class ProfileDone(Exception):
    pass


if profile:
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else []
    )
    # a profiler step ends at each AdamW step (every config has one): skip 5, warm up over 2, record 3
    profiler = torch.profiler.profile(
        activities=activities,
        on_trace_ready=write_profile,
        schedule=torch.profiler.schedule(skip_first=5, wait=0, warmup=2, active=3, repeat=1),
    )
    probed = set()  # each optimizer's first step is train.py's found_inf probe, before any training step

    def count_step(optimizer, args, kwargs):
        if isinstance(optimizer, torch.optim.AdamW) and id(optimizer) in probed:
            profiler.step()
        probed.add(id(optimizer))
    register_optimizer_step_post_hook(count_step)
    with tempfile.TemporaryDirectory() as out:
        sys.argv = [TRAIN, *train_args, f"--out_dir={out}/run", "--init_from=scratch"]
        profiler.start()
        try:
            runpy.run_path(TRAIN, run_name="__main__")
        except ProfileDone:
            sys.exit(0)
    sys.exit("bench.py: train.py ended before its 10th step: give it --max_iters=10 or more")


# ---- the bare step ----------------------------------------------------------------------------
c = train_config
device, device_type, dtype, autocast = resolve_device(c["device"], c["dtype"])
compile, problem = resolve_compile(c["compile"], device_type)
if problem:
    print(f"warning: compile=True needs {problem}; timing uncompiled", file=sys.stderr)
vocab_size, micro_batch_size, batch_size, block_size = (
    c["vocab_size"],
    c["micro_batch_size"],
    c["batch_size"],
    c["block_size"],
)
if vocab_size == 0:
    with open(os.path.join(c["data_dir"], "meta.json")) as f:
        vocab_size = json.load(f)["vocab_size"]
grad_accum = batch_size // micro_batch_size  # one device; the batch-size schedule is not benchmarked

if memory_cap_gb and device_type == "cuda":  # allocations past the cap fail as they would on the smaller card
    torch.cuda.set_per_process_memory_fraction(
        min(1.0, memory_cap_gb * 2**30 / torch.cuda.get_device_properties(device).total_memory)
    )
torch.manual_seed(c["seed"])
with torch.device(device):
    raw_model = GPT(
        ModelArgs(vocab_size=vocab_size, block_size=block_size, n_layer=c["n_layer"], n_head=c["n_head"],
                  n_kv_head=c["n_kv_head"], n_embd=c["n_embd"], mlp_ratio=c["mlp_ratio"], rope_base=c["rope_base"],
                  qk_norm=c["qk_norm"], tie_embeddings=c["tie_embeddings"]),
        checkpoint_blocks=c["activation_checkpointing"],
        loss_chunk_tokens=c["loss_chunk_tokens"],
    )
if c["fp8"]:
    use_fp8(raw_model)
model = torch.compile(raw_model) if compile else raw_model
groups, optimizer_summary = raw_model.param_groups(learning_rate=c["learning_rate"], weight_decay=c["weight_decay"],
                                                  use_muon=c["use_muon"])
# train.py's optimizers (without its per-group learning rates, which cost nothing)
optimizers = [torch.optim.AdamW(groups["adamw"], lr=c["learning_rate"], betas=(c["beta1"], c["beta2"]), fused=True)]
if c["use_muon"]:
    optimizers.append(Muon(groups["muon"], lr=c["muon_lr"], weight_decay=c["muon_weight_decay"],
                           momentum=c["muon_momentum"], orthogonalize=c["muon_orthogonalize"],
                           cautious_decay=c["muon_cautious_decay"], neuron_norm=c["muon_neuron_norm"]))
for opt in optimizers:  # the divergence guard's flag, as train.py sets it: the optimizers' own code path
    opt.found_inf = torch.zeros((), device=device)
x = torch.randint(0, vocab_size, (micro_batch_size, block_size), device=device)
y = torch.randint(0, vocab_size, (micro_batch_size, block_size), device=device)


def forward_backward():
    # loss_reduction="sum" and the scale outside, as train.py does: the same compiled graph, which
    # inductor's cache then shares between this and train.py (dev/gpu_check.py runs both)
    for _ in range(grad_accum):
        with autocast:
            loss = model(x, y, loss_reduction="sum")
        (loss * (1 / (grad_accum * y.numel()))).backward()


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


check_ms = 0.0
if compile:  # what train.py checks before its first step: the compiled gradients are the uncompiled ones
    started = time.perf_counter()
    if problem := compiled_step_problem(model, raw_model, x, y, 1 / (grad_accum * y.numel()), autocast=autocast,
                                        low_precision=dtype == "bfloat16" or c["fp8"]):
        sys.exit(f"bench.py: {problem}; nothing timed (--compile=False times the uncompiled step)")
    check_ms = 1000 * (time.perf_counter() - started)
first_step_ms = check_ms + time_ms(bare_step, 1)  # with compilation and the check, when compiled
for _ in range(warmup_steps - 1):
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
peak = c["peak_flops"] or device_peak_flops(device_type)
result = {
    "device": torch.cuda.get_device_name() if device_type == "cuda" else "cpu",
    "dtype": dtype,
    "compile": compile,
    "activation_checkpointing": c["activation_checkpointing"],
    "fp8": c["fp8"],
    "loss_chunk_tokens": c["loss_chunk_tokens"],
    "params": raw_model.num_params(),
    "tokens_per_step": tokens_per_step,
    "ms_per_step": bare_ms,
    "tokens_per_s": tokens_per_step / bare_ms * 1000,
    "model_flops_per_s": flops_per_token * tokens_per_step / bare_ms * 1000,
    "mfu": flops_per_token * tokens_per_step / bare_ms * 1000 / peak if peak else None,
    # the convention of nanoGPT, nanochat and PaLM: causal attention counted whole (12 * L * H * d * T)
    "mfu_full_attention": raw_model.flops_per_token(full_attention=True) * tokens_per_step / bare_ms * 1000 / peak
    if peak
    else None,
    "first_step_ms": first_step_ms,
    "compile_s": (first_step_ms - bare_ms) / 1000 if compile else 0.0,
    "compile_check_s": check_ms / 1000,  # the first compiled micro-batch and one uncompiled one (infra/parallel.py)
    "peak_memory_mb": peak_memory_mb,
    "adamw_step_ms": optimizer_ms[0],
    "muon_step_ms": optimizer_ms[1] if c["use_muon"] else None,
    "optimizer_share": sum(optimizer_ms) / bare_ms,
    "forward_backward_ms_per_micro_batch": (bare_ms - sum(optimizer_ms)) / grad_accum,
}
del model, raw_model, optimizers  # free the device for train.py

# ---- the full step: train.py itself -------------------------------------------------------------
if full_step:
    # logging once per warmup and once per timed interval keeps its host syncs as rare as in a real
    # run; its warmup rounded up to whole log intervals, so its last record times exactly the bench_steps
    train_warmup = ceil_div(warmup_steps, bench_steps) * bench_steps
    with tempfile.TemporaryDirectory() as out:
        overrides = [
            f"--out_dir={out}/run",
            f"--max_iters={train_warmup + bench_steps}",
            f"--log_interval={bench_steps}",
            f"--eval_interval={10 * (train_warmup + bench_steps)}",
            "--eval_iters=0",
            "--init_from=scratch",
            "--batch_size_schedule=None",
            f"--warmup_iters={min(c['warmup_iters'], train_warmup + bench_steps)}",
        ]
        run = subprocess.run([sys.executable, TRAIN, *train_args, *overrides], capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"bench.py: train.py failed:\n{run.stderr[-3000:]}")
        with open(f"{out}/run/metrics.jsonl") as f:
            records = [json.loads(line) for line in f if '"ms_per_step"' in line]
    result["full_ms_per_step"] = records[-1]["ms_per_step"]
    result["loop_overhead"] = result["full_ms_per_step"] / bare_ms - 1

# ---- the data loader: reading one step's windows (train.py does this while the device computes) ----
if os.path.exists(os.path.join(c["data_dir"], "meta.json")):
    from data import open_dataset, read_windows, sample_windows
    datasets = [open_dataset(c["data_dir"], block_size)]
    started = time.perf_counter()
    for step in range(bench_steps):
        windows = sample_windows(datasets, [1.0], "train", batch_size, (c["seed"], step))
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
if c["use_muon"]:
    rows.append(("Muon step", f"{optimizer_ms[1]:.2f} ms"))
rows.append(("optimizer share", f"{100 * result['optimizer_share']:.1f}% of the bare step"))
if "data_share" in result:
    rows.append(
        ("data loader", f"{result['data_ms_per_step']:.2f} ms/step on the host ({100 * result['data_share']:.1f}%)")
    )
if full_step:
    rows += [
        ("train.py step", f"{result['full_ms_per_step']:.1f} ms"),
        ("loop overhead", f"{100 * result['loop_overhead']:+.1f}%"),
    ]
for name, value in rows:
    print(f"{name:>16}  {value}")
print(json.dumps(result))
