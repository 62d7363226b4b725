"""
The GPU check: every number the speed goals need, from one command on a bare one-GPU machine.
    python dev/gpu_check.py --out_file=$OUT/gpu_check.json   # one H100/H200: 9 minutes, compilation included
    python dev/gpu_check.py --device=cpu                      # a dry run of every part, tiny sizes (the tests)
It needs only the repository, torch and numpy/tiktoken: no rustbpe, no network, no prepared data. It
writes its own dataset under a temporary directory (the demo corpus with the 256-byte tokenizer); the
models use GPT-2's vocabulary size (50,264 with the chat tokens), so their cost is the real one
whatever the token ids. Parts run in order of importance; each prints its lines as soon as it ends,
and out_file (JSON) is rewritten after every part, so a check killed half-way keeps what it measured.
An out_file that exists and is not an earlier check's results is refused before anything runs.
A part that cannot finish before the deadline (time_limit_s from the start) is skipped and reported;
a part that fails (a missing package, an out-of-memory) is reported, never the end of the check, and
makes its exit code 1. Every train.py and bench.py run checks its compiled step against the uncompiled
one before it starts; a smoke that fails (compiled training does not learn here) skips every later part.
 0. the toolchain: whether torch.compile can build here (a C/C++ compiler, Python's headers), and
    the CUDA, cuDNN, NCCL, driver and Triton versions
 1. ceilings: a large bf16 matmul's TFLOP/s, a large device-to-device copy's GB/s, and the 1B block's
    q/k/v and gate/up projections as one matmul against several (what fusing them would gain)
 2. attention alone at the 1B shape, forward + backward, per SDPA backend, with GQA, with K/V expanded
    and at head_dim 128 (half the heads), each backend's output and gradients against fp32 math
 3. a smoke of the tiny config in bf16 + compile (compiled in the dry run too): compiled = uncompiled at
    the start, gradients finite and non-zero, the loss falling; the host syncs between log steps and
    the attention kernels (bench.py --profile=True), the recompiles
 4. the 1B model of configs/pretrain.py as users run it (train.py: Muon, QK-norm, bf16, compile), one GPU's share
    of the config's step (micro-batch 8, 2 accumulation steps): ms/step, tokens/s, MFU, peak memory,
    the compile time, the loop's pause for one checkpoint
 5. the 1B model with Muon (bench.py): Muon's share of the step on one GPU (all the matrices), and
    on 8 (each rank's share of the matrices; the all-gather not measured)
 6. the levers against part 5's step: FP8 matmuls (--fp8=True), the loss unchunked (--loss_chunk_tokens=0)
 7. the largest micro-batch of the 1B model that fits 80 GB compiled (the process capped at memory_cap_gb,
    so an H200 answers for an H100), and its step
 8. the 1B run of part 4 under torchrun --nproc_per_node=1, wrapped in DDP (train.py wraps every torchrun
    run): what the DDP wrapper costs around the compiled model
 9. the same under FSDP2 (data_parallel='fsdp', one rank): the cost of the sharding machinery and of
    compiling block by block, where nothing is sharded yet
10. a 124M GPT-2-size model (bench.py): the bare step's MFU and train.py's loop overhead over it
11. part 8 with DDP's 25 MB buckets (--ddp_bucket_mb=25): the cost of splitting the compiled graph finer
MFU is given in two conventions: this repository's (causal attention counted at half, the work a
flash kernel does) and nanoGPT's, nanochat's and PaLM's (12 * layers * heads * head_dim * seq per token).
"""
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import torch

device = "auto"
out_file = "gpu_check.json"
time_limit_s = 540.0            # the whole check, compilation included; no part starts that cannot end before it
only = ""                       # a comma-separated list of parts to run (e.g. "smoke,1B levers"); "": all
memory_cap_gb = 79.0            # part 7: the GiB the largest micro-batch must fit in: an H100 80GB's usable memory
                                # (about 79.6 GiB) less its CUDA context
exec(open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configurator.py")).read())

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from infra.device import compiler_problem, device_peak_flops, resolve_device  # noqa: E402
from model import GPT, ModelArgs  # noqa: E402
import gpu_kernels  # noqa: E402  (beside this file: parts 1 and 2)
from infra.rundir import check_replaceable_file  # noqa: E402

try:  # a mistyped out_file never replaces a checkpoint's meta.json or a run's metrics
    check_replaceable_file(out_file, lambda r: isinstance(r, dict) and {"parts", "timeline_s"} <= set(r),
                           "a GPU check's results", "out_file")
except ValueError as e:
    sys.exit(f"gpu_check: {e}")
started = time.time()
device, device_type, _, _ = resolve_device(device)
dry_run = device_type != "cuda"
GPT2_VOCAB = 50264  # GPT-2's tokenizer with this repo's chat tokens, as configs/pretrain.py's data has
results = {
    "device": torch.cuda.get_device_name() if not dry_run else "cpu (dry run)",
    "torch": torch.__version__,
    "date": time.strftime("%Y-%m-%d"),
    "time_limit_s": time_limit_s,
    "peak_bf16_flops": device_peak_flops(device_type),
    "parts": {},
    "timeline_s": {},
}


def save():
    """out_file, replaced whole: a kill at any moment leaves the previous complete version."""
    with open(out_file + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(out_file + ".tmp", out_file)


def left():
    return time_limit_s - (time.time() - started)


def run(*args, launcher=(sys.executable,), env=None):
    """A subprocess in the repository, stopped at the deadline with every process it started (torchrun's
    ranks too: a session of its own, killed whole), so nothing is left holding the GPU."""
    process = subprocess.Popen([*launcher, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=max(1.0, left()))
    except subprocess.TimeoutExpired as e:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise TimeoutError(f"stopped at the deadline ({time_limit_s:.0f}s from the start)") from e
    finally:
        if process.poll() is None:  # the check itself interrupted: its children go with it
            os.killpg(process.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def failed(result):
    """The error of a train.py or bench.py run: its one-line error when it printed one (not buried under logs)."""
    text = (result.stderr or result.stdout).strip()
    errors = [line for line in text.splitlines() if line.startswith(("error (rank", "bench.py:"))]
    return RuntimeError(errors[-1] if errors else text[-600:] or f"exit code {result.returncode}")


def model_flops(shape):
    """(FLOPs per token in this repository's convention, in the PaLM convention, parameters) of a shape."""
    with torch.device("meta"):
        model = GPT(ModelArgs(**shape))
    return model.flops_per_token(), model.flops_per_token(full_attention=True), model.num_params()


def mfu(tokens_per_s, shape):
    peak = results["peak_bf16_flops"]
    ours, palm, _ = model_flops(shape)
    return (tokens_per_s * ours / peak, tokens_per_s * palm / peak) if peak else (None, None)


def pct(x):
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "n/a"


# ---- the shapes and the data ------------------------------------------------------------------
# configs/pretrain.py's shape
ONE_B = dict(vocab_size=GPT2_VOCAB, block_size=2048, n_layer=20, n_head=32, n_kv_head=8, n_embd=2048)
GPT2_SMALL = dict(vocab_size=GPT2_VOCAB, block_size=1024, n_layer=12, n_head=12, n_kv_head=12, n_embd=768)
MICRO, STEPS, LOG = 8, 30, 5  # configs/pretrain.py's micro-batch; steps per train.py run; log interval
if dry_run:
    ONE_B = GPT2_SMALL = dict(vocab_size=GPT2_VOCAB, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    MICRO, STEPS, LOG = 4, 6, 2


def shape_args(shape):
    return [f"--{k}={v}" for k, v in shape.items()]


work = tempfile.mkdtemp(prefix="gpu_check_")
data = os.path.join(work, "demo")
prepared = run("prepare.py", f"--out={data}", "--tokenizer=bytes", f"--max_docs={60 if dry_run else 400}")
if prepared.returncode != 0:
    sys.exit(f"gpu_check: could not write its dataset: {failed(prepared)}")
BF16 = [] if dry_run else ["--dtype=bfloat16", "--compile=True"]
NO_COMPILE = ["--compile=False"] if dry_run else []


def train(name, shape, *extra, launcher=(sys.executable,)):
    """train.py on the check's data; its steady ms/step (the records after the first, which holds the
    compilation), tokens/s, peak memory, the compile time and the pause for its one checkpoint (at the
    end: the 1B model's is 13 GB)."""
    out = os.path.join(work, name)
    result = run("train.py", "configs/pretrain.py", *shape_args(shape), f"--data_dir={data}", f"--out_dir={out}",
                 f"--micro_batch_size={MICRO}", f"--batch_size={2 * MICRO}", f"--max_iters={STEPS}",
                 f"--log_interval={LOG}", "--eval_iters=0", f"--eval_interval={STEPS}", "--warmup_iters=5",
                 "--keep_last_checkpoints=1", f"--device={device}", *BF16, *NO_COMPILE, *extra, launcher=launcher)
    if result.returncode != 0:
        raise failed(result)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [r for r in map(json.loads, f) if "ms_per_step" in r]
    shutil.rmtree(out)  # the 1B model's checkpoints are 13 GB
    steady = statistics.median(r["ms_per_step"] for r in records[1:])
    tokens_per_s = 2 * MICRO * shape["block_size"] / steady * 1000
    ours, palm = mfu(tokens_per_s, shape)
    pauses = [float(p) for p in re.findall(r"training paused ([0-9.]+)s", result.stdout)]
    return {
        "ms_per_step": steady,
        "tokens_per_s": tokens_per_s,
        "mfu": ours,
        "mfu_full_attention": palm,
        "peak_memory_mb": max(r["peak_memory_mb"] for r in records),
        "compile_s": max(0.0, LOG * (records[0]["ms_per_step"] - steady) / 1000),
        "checkpoint_pause_s": max(pauses, default=None),
        "ms_per_step_by_log": [round(r["ms_per_step"], 1) for r in records],
    }


def bench(shape, *extra):
    steps = ["--warmup_steps=1", "--bench_steps=2"] if dry_run else ["--warmup_steps=3", "--bench_steps=10"]
    result = run("bench.py", "configs/pretrain.py", *shape_args(shape), f"--data_dir={data}", f"--device={device}",
                 *BF16, *NO_COMPILE, *steps, *extra)
    if result.returncode != 0:
        raise failed(result)
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---- the parts --------------------------------------------------------------------------------
def toolchain():
    """What torch.compile and the GPU stack need, probed before anything is compiled: without a
    compiler every compiled part would fail (train.py then runs uncompiled, with a warning)."""
    import sysconfig
    problem = compiler_problem(device_type)
    r = {
        "compiler_problem": problem,
        "cc": shutil.which(os.environ.get("CC") or "cc"),
        "cxx": shutil.which(os.environ.get("CXX") or "g++"),
        "python_headers": os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if not dry_run and hasattr(torch.cuda, "nccl") else None,
        "driver": None,
    }
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True)
        r["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    try:
        import triton
        r["triton"] = triton.__version__
    except ImportError:
        r["triton"] = None
    r["lines"] = [("compile: OK" if problem is None else f"compile: NOT AVAILABLE, needs {problem}")
                  + f"; cc {r['cc']}, c++ {r['cxx']}, Python.h {'yes' if r['python_headers'] else 'no'}",
                  f"CUDA {r['cuda']}, cuDNN {r['cudnn']}, NCCL {r['nccl']}, driver {r['driver']}, triton {r['triton']}"]
    return r


def train_line(r):
    return (f"{r['ms_per_step']:.1f} ms/step, {r['tokens_per_s']:,.0f} tok/s, MFU {pct(r['mfu'])} (PaLM convention "
            f"{pct(r['mfu_full_attention'])}), peak {r['peak_memory_mb'] / 1024:.1f} GB")


def one_b_as_configured():
    r = train("1b", ONE_B)
    _, _, params = model_flops(ONE_B)
    r["lines"] = [f"{params / 1e9:.2f}B parameters, micro-batch {MICRO} x 2 accumulation steps: " + train_line(r),
                  f"compile ~{r['compile_s']:.0f}s; the loop paused {r['checkpoint_pause_s']}s for one checkpoint"]
    return r


def gpt2_small():
    r = bench(GPT2_SMALL, f"--micro_batch_size={2 * MICRO}", f"--batch_size={4 * MICRO}")
    r["lines"] = [
        f"bare step {r['ms_per_step']:.1f} ms, {r['tokens_per_s']:,.0f} tok/s, MFU {pct(r['mfu'])} (PaLM convention "
        f"{pct(r['mfu_full_attention'])}); train.py's step {r['full_ms_per_step']:.1f} ms: loop overhead "
        f"{100 * r['loop_overhead']:+.1f}%; data loader {pct(r.get('data_share'))} of the step"
    ]
    return r


def muon_work_on(gpus, shape):
    """The fraction of one GPU's Muon work that each of gpus ranks does: each orthogonalizes its share
    (rounded up) of every group of same-shape matrices, a matrix's cost ~ rows * cols * min(rows, cols)."""
    from muon import share
    with torch.device("meta"):
        model = GPT(ModelArgs(**shape))
    shapes = [tuple(p.shape) for name, p in model.named_parameters() if name.startswith("layers.") and p.dim() == 2]
    cost = {s: s[0] * s[1] * min(s) for s in shapes}
    groups = {s: shapes.count(s) for s in shapes}
    return sum(share(n, 0, gpus)[0] * cost[s] for s, n in groups.items()) / sum(n * cost[s] for s, n in groups.items())


def one_b_with_muon():
    r = bench(ONE_B, f"--micro_batch_size={MICRO}", f"--batch_size={2 * MICRO}", "--use_muon=True", "--full_step=False")
    r["muon_share"] = r["muon_step_ms"] / r["ms_per_step"]  # one GPU orthogonalizes every matrix
    r["muon_share_8_gpus"] = muon_work_on(8, ONE_B) * r["muon_step_ms"] / r["ms_per_step"]
    r["lines"] = [f"bare step {r['ms_per_step']:.1f} ms (MFU {pct(r['mfu'])}): Muon {r['muon_step_ms']:.1f} ms = "
                  f"{pct(r['muon_share'])} of it on one GPU, which orthogonalizes every matrix; on 8 GPUs each does "
                  f"{pct(muon_work_on(8, ONE_B))} of that work: {pct(r['muon_share_8_gpus'])} of the step, plus the "
                  f"all-gather of the updates (not measured on one GPU); AdamW (embedding, head, gains) "
                  f"{r['adamw_step_ms']:.1f} ms"]
    return r


def levers():
    """FP8 matmuls on, and the loss unchunked, each against part 5's bare step (the config's settings);
    each lever's record saved as soon as it is measured, so a deadline in the second keeps the first."""
    base = results["parts"].get("1B with Muon", {})
    r = results["parts"]["1B levers"]
    lines = r["lines"] = []
    for name, setting in (("fp8", "--fp8=True"), ("unchunked_loss", "--loss_chunk_tokens=0")):
        b = bench(ONE_B, f"--micro_batch_size={MICRO}", f"--batch_size={2 * MICRO}", "--full_step=False", setting)
        speed = base["ms_per_step"] / b["ms_per_step"] - 1 if base.get("ms_per_step") else None
        memory = b["peak_memory_mb"] - base["peak_memory_mb"] if base.get("peak_memory_mb") else None
        r[name] = {"ms_per_step": b["ms_per_step"], "mfu": b["mfu"], "peak_memory_mb": b["peak_memory_mb"],
                   "speedup": speed, "extra_memory_mb": memory, "compile_s": b["compile_s"]}
        lines.append(f"{setting}: bare step {b['ms_per_step']:.1f} ms (MFU {pct(b['mfu'])}), "
                     + (f"{100 * speed:+.1f}% speed, {memory / 1024:+.2f} GB peak against part 5" if speed is not None
                        else "part 5 did not run"))
        save()
    return r


def ddp_small_buckets():
    plain = results["parts"].get("1B under DDP", {}).get("ms_per_step")
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1")
    r = train("1b_ddp25", ONE_B, "--ddp_bucket_mb=25", launcher=torchrun)
    r["against_250_mb"] = r["ms_per_step"] / plain - 1 if plain else None
    r["lines"] = ["82 graphs at 1B instead of 15 (on one GPU the split's cost, no all-reduce to overlap): "
                  + train_line(r) + (f"; {100 * r['against_250_mb']:+.1f}% against 250 MB" if plain else "")]
    return r


def one_b_ddp():
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1")
    r = train("1b_ddp", ONE_B, launcher=torchrun)
    plain = results["parts"].get("1B as configured", {}).get("ms_per_step")
    r["ddp_cost"] = r["ms_per_step"] / plain - 1 if plain else None
    r["lines"] = ["under torchrun (DDP around the compiled model): " + train_line(r)
                  + (f"; DDP costs {100 * r['ddp_cost']:+.1f}% of the step" if plain else "")]
    return r


def one_b_fsdp():
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1")
    r = train("1b_fsdp", ONE_B, "--data_parallel=fsdp", launcher=torchrun)
    plain = results["parts"].get("1B as configured", {}).get("ms_per_step")
    r["fsdp_cost"] = r["ms_per_step"] / plain - 1 if plain else None
    r["lines"] = ["under FSDP2 on one GPU (per-block compile, bf16 parameters, fp32 reduction): " + train_line(r)
                  + (f"; {100 * r['fsdp_cost']:+.1f}% against no wrapper" if plain else "")
                  + f"; compile ~{r['compile_s']:.0f}s"]
    return r


def smoke():
    """The tiny config compiled (in the dry run too): train.py's own start-up check compares the compiled
    step with the uncompiled one, and the gradients must be finite and non-zero and the loss falling, or
    the part fails: every later part would be timing graphs that do not learn."""
    args = ["configs/pretrain.py", "configs/tiny.py", f"--data_dir={data}", "--eval_tasks={}", f"--device={device}",
            "--eval_interval=1000", "--log_interval=6", "--compile=True", *BF16,
            *(["--micro_batch_size=4", "--batch_size=8"] if dry_run else [])]  # the dry run: fewer, smaller steps
    result = run("train.py", *args, f"--out_dir={work}/smoke", f"--max_iters={12 if dry_run else 30}",
                 env={"TORCH_LOGS": "dynamo,recompiles"})
    if result.returncode != 0:
        raise failed(result)
    with open(f"{work}/smoke/metrics.jsonl") as f:
        logged = [r for r in map(json.loads, f) if "loss" in r]
    losses, norms = [r["loss"] for r in logged], [r["grad_norm"] for r in logged]
    if not (len(losses) > 1 and all(0 < abs(x) < 1e9 for x in losses + norms) and losses[-1] < losses[0] - 0.1):
        raise RuntimeError(f"the compiled tiny config does not learn: losses {losses}, gradient norms {norms}")
    profiled = run("bench.py", *args, *NO_COMPILE, "--max_iters=12", "--profile=True",
                   f"--profile_dir={work}/profile")
    if profiled.returncode != 0:
        raise failed(profiled)
    with open(f"{work}/profile/summary.json") as f:
        syncs = json.load(f)
    r = {"ok": True, "losses": losses, "grad_norms": norms,
         "item_calls_between_logs": syncs["item_calls"], "cuda_syncs_between_logs": syncs["cuda_syncs"],
         "attention_ops": syncs["attention_ops"],
         "compilations": result.stderr.count("torchdynamo start tracing forward"),  # 1 expected
         "recompiles": result.stderr.count("Recompiling function")}  # 0 expected: evaluation runs uncompiled
    r["lines"] = [
        f"ok, compiled = uncompiled at the start: losses {[round(x, 3) for x in losses]}",
        f"in 3 steps between log steps: {r['item_calls_between_logs']} .item(), {r['cuda_syncs_between_logs']} "
        f"CUDA synchronizations; compilations {r['compilations']}, recompiles {r['recompiles']}; "
        f"attention: {r['attention_ops']}",
    ]
    return r


def largest_micro_batch():
    fits, tried = None, []
    # compiled, as training runs (each size one compilation; the largest that fits is then timed from the cache)
    for micro in ([8, 4] if dry_run else [16, 12, 8]):
        trial = run("bench.py", "configs/pretrain.py", *shape_args(ONE_B), f"--data_dir={data}", f"--device={device}",
                    f"--micro_batch_size={micro}", f"--batch_size={micro}", "--full_step=False", *BF16, *NO_COMPILE,
                    "--warmup_steps=1", "--bench_steps=1", f"--memory_cap_gb={memory_cap_gb}")
        tried.append(micro)
        if trial.returncode == 0:
            fits = micro
            break
    if fits is None:
        raise RuntimeError(f"no micro-batch of {tried} fits {memory_cap_gb} GB")
    r = bench(ONE_B, f"--micro_batch_size={fits}", f"--batch_size={2 * fits}", "--full_step=False",
              f"--memory_cap_gb={memory_cap_gb}")
    r.update(micro_batch_size=fits, tried=tried)
    r["lines"] = [
        f"micro-batch {fits} fits {memory_cap_gb:.1f} GiB (tried {tried}); compiled: {r['ms_per_step']:.1f} ms/step, "
        f"{r['tokens_per_s']:,.0f} tok/s, MFU {pct(r['mfu'])} (PaLM convention {pct(r['mfu_full_attention'])}), "
        f"peak {r['peak_memory_mb'] / 1024:.1f} GB"
    ]
    return r


# (name, the least time it needs on an H100/H200 in seconds, the part): the most decisive answers per
# second first; DDP and FSDP2 after the plain 1B run they are compared with
PARTS = [
    ("toolchain", 1, toolchain),
    ("ceilings", 20, lambda: gpu_kernels.ceilings(device=device, dry_run=dry_run, shape=ONE_B, micro=MICRO)),
    ("attention", 20, lambda: gpu_kernels.attention(device=device, dry_run=dry_run, shape=ONE_B, micro=MICRO)),
    ("smoke", 60, smoke),
    ("1B as configured", 150, one_b_as_configured),
    ("1B with Muon", 60, one_b_with_muon),  # the same compiled graph as the part before (inductor's cache)
    ("1B levers", 120, levers),  # two more compilations of the 1B step
    ("1B at 80 GB", 150, largest_micro_batch),  # up to three compilations
    ("1B under DDP", 60, one_b_ddp),
    ("1B under FSDP2", 60, one_b_fsdp),
    ("124M", 60, gpt2_small),
    ("DDP with 25 MB buckets", 60, ddp_small_buckets),
]

print(f"GPU check: {results['device']}, torch {results['torch']}, {results['date']}; deadline {time_limit_s:.0f}s; "
      f"results in {out_file}", flush=True)
reached, planned = [], 0.0
for name, needs, _ in PARTS:  # by each part's own estimate: what a run of time_limit_s can reach
    planned += needs
    if planned <= time_limit_s:
        reached.append(name)
print(f"on an H100/H200 this budget reaches, by the parts' estimates ({planned:.0f}s for all): "
      + ", ".join(reached), flush=True)
asked = [name.strip() for name in only.split(",") if name.strip()] or [name for name, _, _ in PARTS]
if unknown := set(asked) - {name for name, _, _ in PARTS}:
    sys.exit(f"gpu_check: only names unknown parts {sorted(unknown)}; the parts are {[n for n, _, _ in PARTS]}")
for name, needs, part in PARTS:
    if name not in asked:
        results["parts"][name] = {"skipped": "not asked for (--only)"}
    elif "error" in results["parts"].get("smoke", {}):  # every later part times compiled graphs
        results["parts"][name] = {"skipped": "the smoke failed: compiled training does not learn here"}
    elif left() < (5 if dry_run else needs):
        results["parts"][name] = {"skipped": f"out of time: {left():.0f}s left, the part needs about {needs}s"}
    else:
        results["parts"][name] = {}  # a part may save what it has measured so far here
        try:
            results["parts"][name] = part()
        except TimeoutError as e:  # out of time, not a failure: what it measured so far is kept
            results["parts"][name]["stopped"] = str(e)
        except Exception as e:  # a part that fails is reported, never the end of the check, keeping what it measured
            results["parts"][name]["error"] = f"{type(e).__name__}: {str(e).strip()[-600:]}"
    results["timeline_s"][name] = round(time.time() - started, 1)
    save()
    outcome = results["parts"][name]
    lines = [*outcome.get("lines", []), *[f"{key}: {outcome[key]}" for key in ("error", "stopped") if key in outcome]]
    lines = lines or [outcome.get("skipped")]
    print(f"[{time.time() - started:5.0f}s] {name}: " + "\n         ".join(lines), flush=True)
results["seconds"] = round(time.time() - started, 1)
save()
shutil.rmtree(work, ignore_errors=True)
failures = [name for name, outcome in results["parts"].items() if "error" in outcome]
print(f"done in {results['seconds']:.0f}s: {out_file}" + (f"; FAILED: {', '.join(failures)}" if failures else ""))
sys.exit(1 if failures else 0)
