"""
The GPU check: how fast this repo trains on the card at hand, against the card's own limits.
    python gpu_check.py                     # on one H100/H200: about 8 minutes, compilation included
    python gpu_check.py --device=cpu        # a dry run of every part, with tiny sizes (tests use it)
1. the card's ceilings: a large bf16 matmul's TFLOP/s, a large device-to-device copy's GB/s
2. which kernel SDPA runs for the models' attention (flash or not)
3. a smoke: a few steps of the tiny config in bf16 with torch.compile: loss finite and falling
4. for the 1B model of configs/pretrain.py (the largest micro-batch that fits) and a 124M
   GPT-2-size model: bench.py with Muon, compile on and off: tokens/s, MFU (against the datasheet
   peak and against the measured matmul ceiling), ms/step, peak memory, Muon's and the data
   loader's share of the step, train.py's loop overhead
Prints a table and writes everything to gpu_check.json.
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
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())

from model import device_peak_flops, resolve_device

ROOT = os.path.dirname(os.path.abspath(__file__))
device, device_type, _, _ = resolve_device(device)
dry_run = device_type != "cuda"
results = {"device": torch.cuda.get_device_name() if not dry_run else "cpu (dry run)", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "peak_bf16_flops": device_peak_flops(device_type)}


def timed(function, repeats):
    function()
    if not dry_run:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    if not dry_run:
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


# 1. ceilings
n = 1024 if dry_run else 8192
a = torch.randn(n, n, device=device, dtype=torch.float32 if dry_run else torch.bfloat16)
b = torch.randn_like(a)
results["matmul_tflops"] = 2 * n**3 / timed(lambda: a @ b, 3 if dry_run else 50) / 1e12
src = torch.empty(2**24 if dry_run else 2**30, dtype=torch.uint8, device=device)
dst = torch.empty_like(src)
results["copy_gb_per_s"] = 2 * src.numel() / timed(lambda: dst.copy_(src), 3 if dry_run else 20) / 1e9  # read + write
del a, b, src, dst

# 2. the attention kernel, as the profiler sees it, at the 1B model's shape
q = torch.randn(1, 32, 256 if dry_run else 2048, 64, device=device, dtype=torch.float32 if dry_run else torch.bfloat16)
with torch.profiler.profile() as profiler:
    torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    if not dry_run:
        torch.cuda.synchronize()
kernels = [e.name for e in profiler.events() if "attention" in e.name.lower() or "flash" in e.name.lower()]
results["sdpa_kernels"] = sorted(set(kernels))[:6]
results["sdpa_flash"] = any("flash" in k.lower() for k in kernels)


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)


# 3. the smoke: tiny config, bf16 + compile on the GPU
if not os.path.exists(os.path.join(ROOT, "data/demo/meta.json")):
    run("prepare.py")
with tempfile.TemporaryDirectory() as tmp:
    smoke = run("train.py", "configs/pretrain.py", "configs/tiny.py", f"--device={device}", f"--out_dir={tmp}/smoke",
                "--max_iters=30", "--eval_interval=1000", "--log_interval=5",
                *(["--compile=False"] if dry_run else ["--dtype=bfloat16", "--compile=True"]))
    losses = []
    if smoke.returncode == 0:
        with open(f"{tmp}/smoke/metrics.jsonl") as f:
            losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
results["smoke"] = {"ok": smoke.returncode == 0 and all(map(lambda x: x == x and abs(x) < 1e9, losses))
                    and len(losses) > 1 and losses[-1] < losses[0], "losses": losses,
                    "error": smoke.stderr[-500:] if smoke.returncode else None}


# 4. the models
def bench(*args):
    result = run("bench.py", "configs/pretrain.py", f"--device={device}", "--data_dir=data/demo", *args)
    if result.returncode != 0:
        return {"error": (result.stderr or result.stdout)[-300:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


MODELS = {  # the 124M one is GPT-2 small's shape; both use GPT-2's vocabulary size
    "1B": ["--vocab_size=50257"],
    "124M": ["--vocab_size=50257", "--n_layer=12", "--n_head=12", "--n_kv_head=12", "--n_embd=768", "--block_size=1024"],
}
if dry_run:
    MODELS = {name: ["--n_layer=2", "--n_head=4", "--n_kv_head=2", "--n_embd=64", "--block_size=64"] for name in MODELS}
steps = ["--warmup_steps=1", "--bench_steps=2"] if dry_run else ["--warmup_steps=5", "--bench_steps=10"]
for name, shape in MODELS.items():
    # the largest micro-batch that fits, tried without compile (quick); one micro-batch per step
    fits = None
    for micro in ([4, 2] if dry_run else [32, 16, 8, 4, 2, 1]):
        trial = bench(*shape, f"--micro_batch_size={micro}", f"--batch_size={micro}", "--compile=False",
                      "--full_step=False", "--warmup_steps=0", "--bench_steps=1")
        if "error" not in trial:
            fits = micro
            break
    if fits is None:
        results[name] = {"error": trial["error"]}
        continue
    batch = [f"--micro_batch_size={fits}", f"--batch_size={fits * (1 if dry_run else 4)}"]
    compiled = bench(*shape, *batch, *steps, "--use_muon=True", *([] if dry_run else ["--compile=True"]))
    eager = bench(*shape, *batch, *steps, "--use_muon=True", "--compile=False", "--full_step=False")
    for run_result in (compiled, eager):
        if "model_flops_per_s" in run_result:
            run_result["mfu_vs_measured_matmul"] = run_result["model_flops_per_s"] / (results["matmul_tflops"] * 1e12)
    results[name] = {"micro_batch_size": fits, "compiled": compiled, "eager": eager}

with open(out_file, "w") as f:
    json.dump(results, f, indent=1)


def pct(x):
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "n/a"


print(f"\nGPU check: {results['device']}, torch {results['torch']}, {results['date']}")
print(f"  matmul ceiling      {results['matmul_tflops']:.1f} TFLOP/s   copy {results['copy_gb_per_s']:.0f} GB/s")
print(f"  SDPA flash          {results['sdpa_flash']}  {results['sdpa_kernels'][:2]}")
print(f"  smoke (tiny, bf16)  {'ok' if results['smoke']['ok'] else 'FAILED'}  losses {[round(x, 3) for x in results['smoke']['losses'][:6]]}")
print(f"  {'model':6} {'compile':7} {'micro':>5} {'tok/s':>10} {'ms/step':>8} {'MFU':>6} {'vs mm':>6} {'mem MB':>8} "
      f"{'Muon':>6} {'data':>6} {'loop':>6}")
for name in MODELS:
    entry = results[name]
    if "error" in entry:
        print(f"  {name:6} error: {entry['error'][-120:]}")
        continue
    for label in ("compiled", "eager"):
        r = entry[label]
        if "error" in r:
            print(f"  {name:6} {label:7} error: {r['error'][-100:]}")
            continue
        muon_share = (r["muon_step_ms"] or 0) / r["ms_per_step"]
        print(f"  {name:6} {label:7} {entry['micro_batch_size']:>5} {r['tokens_per_s']:>10,.0f} {r['ms_per_step']:>8.1f} "
              f"{pct(r['mfu']):>6} {pct(r['mfu_vs_measured_matmul']):>6} {r['peak_memory_mb']:>8,.0f} {pct(muon_share):>6} "
              f"{pct(r.get('data_share')):>6} {pct(r.get('loop_overhead')):>6}")
print(f"  full results: {out_file}")
