"""
The GPU check: how fast this repo trains on the card at hand, against the card's own limits.
    python gpu_check.py                     # on one H100/H200: under 8 minutes, compilation included
    python gpu_check.py --device=cpu        # a dry run of every part, with tiny sizes (tests use it)
1. the card's ceilings: a large bf16 matmul's TFLOP/s, a large device-to-device copy's GB/s
2. which backend SDPA runs for the models' attention (flash, cuDNN, memory-efficient or math)
3. a smoke: 30 steps of the tiny config in bf16 with torch.compile: loss finite and falling, and
   from its profile the host syncs between log steps (.item() calls, CUDA synchronizations) and
   the recompiles
4. for the 1B model of configs/pretrain.py (the largest micro-batch that fits) and a 124M
   GPT-2-size model: bench.py with Muon, compile on and off: tokens/s, MFU (against the datasheet
   peak and against the measured matmul ceiling), ms/step, peak memory, Muon's and the data
   loader's share of the step; train.py's loop overhead (on the 124M model, where a fixed
   per-step cost weighs most)
Parts run in that order of importance; one that would start after time_limit_s is skipped and
reported as such. Prints a table and writes everything to gpu_check.json.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

device = "auto"
out_file = "gpu_check.json"
time_limit_s = 400              # no new part starts after this; a running one gets 60 s more at most
exec(open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configurator.py")).read())

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from model import device_peak_flops, resolve_device  # noqa: E402

started = time.time()
device, device_type, _, _ = resolve_device(device)
dry_run = device_type != "cuda"
results = {"device": torch.cuda.get_device_name() if not dry_run else "cpu (dry run)", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "peak_bf16_flops": device_peak_flops(device_type)}


def timed(function, repeats):
    function()
    if not dry_run:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        function()
    if not dry_run:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


# 1. ceilings
n = 1024 if dry_run else 8192
a = torch.randn(n, n, device=device, dtype=torch.float32 if dry_run else torch.bfloat16)
b = torch.randn_like(a)
results["matmul_tflops"] = 2 * n**3 / timed(lambda: a @ b, 3 if dry_run else 50) / 1e12
src = torch.empty(2**24 if dry_run else 2**30, dtype=torch.uint8, device=device)
dst = torch.empty_like(src)
results["copy_gb_per_s"] = 2 * src.numel() / timed(lambda: dst.copy_(src), 3 if dry_run else 20) / 1e9  # read + write
del a, b, src, dst

# 2. the attention backend SDPA picks for the 1B model's attention (32 query and 8 key-value heads
# of 64, causal, bf16), forward and backward, as the profiler sees it
shape = (1, 32, 256 if dry_run else 2048, 64)
dtype = torch.float32 if dry_run else torch.bfloat16
q = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
k, v = (torch.randn(shape[0], 8, *shape[2:], device=device, dtype=dtype, requires_grad=True) for _ in range(2))
with torch.profiler.profile() as profiler:
    torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
    if not dry_run:
        torch.cuda.synchronize()
ops = sorted({e.name for e in profiler.events() if e.name.startswith(("aten::_scaled_dot_product", "aten::_flash",
                                                                       "aten::_efficient", "aten::_cudnn"))})
results["sdpa_ops"] = ops
results["sdpa_backend"] = next((name for name in ("flash", "cudnn", "efficient", "math") if any(name in op for op in ops)),
                               "unknown")
del q, k, v
if not dry_run:
    torch.cuda.empty_cache()  # the subprocesses below want the whole card


def run(*args, env=None):
    """A subprocess, given the time left plus a minute (at least 30 s)."""
    try:
        return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, **(env or {})}, timeout=max(30, time_limit_s + 60 - (time.time() - started)))
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(args, -1, "", "timed out: out of gpu_check's time")


def out_of_time():
    return time.time() - started > time_limit_s


def part_done(name):  # when each part ended, in seconds from the start: for tuning time_limit_s
    results.setdefault("timeline_s", {})[name] = round(time.time() - started, 1)


part_done("ceilings and SDPA")


# 3. the smoke: tiny config, bf16 + compile on the GPU; log steps 6, 12, ...: the profiled steps 8-10 have none
if not os.path.exists(os.path.join(ROOT, "data/demo/meta.json")):
    run("prepare.py")
with tempfile.TemporaryDirectory() as tmp:
    smoke_args = ["configs/pretrain.py", "configs/tiny.py", f"--device={device}", "--eval_interval=1000", "--log_interval=6",
                  *(["--compile=False"] if dry_run else ["--dtype=bfloat16", "--compile=True"])]
    smoke = run("train.py", *smoke_args, f"--out_dir={tmp}/smoke", "--max_iters=30", env={"TORCH_LOGS": "recompiles"})
    profiled = run("bench.py", *smoke_args, "--max_iters=12", "--profile=True", f"--profile_dir={tmp}/profile")
    smoke.stderr += profiled.stderr
    losses, syncs = [], {}
    try:  # a part that fails is reported, never the end of the check
        with open(f"{tmp}/smoke/metrics.jsonl") as f:
            losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
        with open(f"{tmp}/profile/summary.json") as f:
            syncs = json.load(f)
    except (OSError, ValueError) as e:
        smoke.stderr += f"\n{type(e).__name__}: {e}"
results["smoke"] = {"ok": smoke.returncode == 0 and all(map(lambda x: x == x and abs(x) < 1e9, losses))
                    and len(losses) > 1 and losses[-1] < losses[0], "losses": losses,
                    "item_calls_between_logs": syncs.get("item_calls"), "cuda_syncs_between_logs": syncs.get("cuda_syncs"),
                    "attention_ops": syncs.get("attention_ops"),
                    "recompiles": smoke.stderr.count("Recompiling function"),  # 1 expected: train after eval's no-grad graph
                    "error": smoke.stderr[-500:] if smoke.returncode or not syncs else None}
part_done("smoke")


# 4. the models
def bench(*args):
    if out_of_time():
        return {"error": "skipped: out of time"}
    result = run("bench.py", "configs/pretrain.py", f"--device={device}", "--data_dir=data/demo", *args)
    try:
        if result.returncode == 0:
            return json.loads(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        pass
    return {"error": (result.stderr or result.stdout)[-300:]}


MODELS = {  # the 124M one is GPT-2 small's shape; both use GPT-2's vocabulary size
    "1B": ["--vocab_size=50257"],
    "124M": ["--vocab_size=50257", "--n_layer=12", "--n_head=12", "--n_kv_head=12", "--n_embd=768", "--block_size=1024"],
}
MICRO_BATCHES = {"1B": [16, 8, 4, 2, 1], "124M": [32, 16, 8, 4]}  # sequences; tried largest first
CONFIG_BATCH_SIZE = 128  # configs/pretrain.py's sequences per optimizer step
if dry_run:
    # tiny shapes, but GPT-2's vocabulary as in the real run (larger than the demo data's)
    MODELS = {name: ["--vocab_size=50257", "--n_layer=2", "--n_head=4", "--n_kv_head=2", "--n_embd=64", "--block_size=64"]
              for name in MODELS}
    MICRO_BATCHES = {name: [4, 2] for name in MODELS}
steps = ["--warmup_steps=1", "--bench_steps=2"] if dry_run else ["--warmup_steps=3", "--bench_steps=6"]
compile_flag = [] if dry_run else ["--compile=True"]
fits = {}
for name in MODELS:  # in order of importance: compiled first; compile off only with the time left
    # the largest micro-batch that fits, tried without compile (quick, and compiled code needs less memory)
    for micro in MICRO_BATCHES[name]:
        trial = bench(*MODELS[name], f"--micro_batch_size={micro}", f"--batch_size={micro}", "--compile=False",
                      "--full_step=False", "--warmup_steps=0", "--bench_steps=1")
        if "error" not in trial:
            fits[name] = micro
            break
    if name not in fits:
        results[name] = {"error": trial["error"]}
        continue
    batch = [f"--micro_batch_size={fits[name]}", f"--batch_size={fits[name] * (1 if dry_run else 4)}"]
    part_done(f"{name} micro-batch search")
    results[name] = {"micro_batch_size": fits[name], "compiled": bench(
        *MODELS[name], *batch, *steps, "--use_muon=True", *compile_flag, f"--full_step={name == '124M'}")}
    part_done(f"{name} compiled")
for name in fits:
    batch = [f"--micro_batch_size={fits[name]}", f"--batch_size={fits[name] * (1 if dry_run else 4)}"]
    results[name]["eager"] = bench(*MODELS[name], *batch, *steps, "--use_muon=True", "--compile=False", "--full_step=False")
    part_done(f"{name} eager")
    for run_result in (results[name]["compiled"], results[name]["eager"]):
        if "model_flops_per_s" in run_result:
            run_result["mfu_vs_measured_matmul"] = run_result["model_flops_per_s"] / (results["matmul_tflops"] * 1e12)
            # Muon's share of a step of configs/pretrain.py's batch on one GPU; with N GPUs each does
            # 1/N of the accumulation and 1/N of Newton-Schulz, so the share stays about the same
            micro_steps = CONFIG_BATCH_SIZE / fits[name]
            run_result["muon_share_at_config_batch"] = run_result["muon_step_ms"] / (
                run_result["forward_backward_ms_per_micro_batch"] * micro_steps + run_result["adamw_step_ms"]
                + run_result["muon_step_ms"])
results["seconds"] = time.time() - started

with open(out_file, "w") as f:
    json.dump(results, f, indent=1)


def pct(x):
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "n/a"


smoke = results["smoke"]
print(f"\nGPU check: {results['device']}, torch {results['torch']}, {results['date']}, {results['seconds']:.0f} s")
print(f"  matmul ceiling      {results['matmul_tflops']:.1f} TFLOP/s   copy {results['copy_gb_per_s']:.0f} GB/s")
print(f"  SDPA backend        {results['sdpa_backend']}  {results['sdpa_ops'][:3]}")
print(f"  smoke (tiny, {'fp32' if dry_run else 'bf16, compiled'})  {'ok' if smoke['ok'] else 'FAILED'}  "
      f"losses {[round(x, 3) for x in smoke['losses'][:6]]}")
print(f"  host syncs in 3 steps between logs: {smoke['item_calls_between_logs']} .item(), "
      f"{smoke['cuda_syncs_between_logs']} CUDA syncs; recompiles: {smoke['recompiles']}")
print(f"  attention in the training step: {smoke['attention_ops']}")
if smoke["error"]:
    print(f"  smoke error: {smoke['error'][-300:]}")
print(f"  {'model':6} {'compile':8} {'micro':>5} {'tok/s':>10} {'ms/step':>8} {'MFU':>6} {'vs mm':>6} {'mem MB':>8} "
      f"{'Muon':>6} {'Muon@128':>8} {'data':>6} {'loop':>6}")
for name in MODELS:
    entry = results[name]
    if "error" in entry:
        print(f"  {name:6} error: {entry['error'][-120:]}")
        continue
    for label in ("compiled", "eager"):
        r = entry[label]
        if "error" in r:
            print(f"  {name:6} {label:8} error: {r['error'][-100:]}")
            continue
        print(f"  {name:6} {label:8} {entry['micro_batch_size']:>5} {r['tokens_per_s']:>10,.0f} {r['ms_per_step']:>8.1f} "
              f"{pct(r['mfu']):>6} {pct(r['mfu_vs_measured_matmul']):>6} {r['peak_memory_mb']:>8,.0f} "
              f"{pct(r['muon_step_ms'] / r['ms_per_step']):>6} {pct(r['muon_share_at_config_batch']):>8} "
              f"{pct(r.get('data_share')):>6} {pct(r.get('loop_overhead')):>6}")
print(f"  (a step here is {1 if dry_run else 4} micro-batch(es); Muon@128: Muon's share of a 128-sequence step, "
      f"configs/pretrain.py's batch, on one GPU)")
print(f"  parts ended at (s): {results['timeline_s']}")
print(f"  full results: {out_file}")
