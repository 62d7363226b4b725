"""
Train a GPT. One process on one device:
    python train.py configs/pretrain.py configs/tiny.py
or data-parallel across GPUs and machines with torchrun:
    torchrun --standalone --nproc_per_node=8 train.py configs/pretrain.py
Every global below is a config variable; config files and --key=value override them (configurator.py;
python train.py --help lists them).
"""
from dataclasses import asdict
import math
import os
import time

# ----------------------------------------------------------------------------------------------
# config
# I/O
out_dir = "out/run"
data_dir = "data/demo"          # a directory written by prepare.py
data_mixture = None             # or several, with weights: {'data/web': 0.7, 'data/chat': 0.3} (replaces data_dir)
use_loss_mask = False           # learn only the targets a chat dataset marks (the assistant's words)
align_windows = False           # text windows start at a document's first token, as a chat dataset's always do
document_masking = False        # attention does not cross the documents inside a window (<|endoftext|> starts one)
init_from = "scratch"           # 'scratch', 'resume' (out_dir's newest checkpoint), or an earlier stage's out_dir,
                                # checkpoint or hf:<dir> for its weights only (README: "Checkpoints")
init_from_unfinished = False    # let a handoff start from an earlier stage that stopped before its max_iters
eval_interval = 250             # evaluate and checkpoint every this many steps (and at the end)
eval_iters = 20                 # micro-batches per evaluation (split across ranks); 0: no evaluation
val_full_pass = None            # True: every val token once (seed-independent: compare recipes with it); False:
                                # eval_iters micro-batches of random windows; None: the full pass if no larger
eval_tasks = {}                 # downstream tasks scored at every evaluation: {task .jsonl: examples (0: all)}
log_interval = 10               # a log line and a metrics.jsonl record every this many steps
keep_last_checkpoints = 3       # older checkpoints are deleted once a newer one is complete
keep_every_checkpoints = 0      # also keep every checkpoint whose step is a multiple of this, forever (0: none)
max_bad_steps = 20              # stop after this many steps in a row with a non-finite loss or gradient
wandb_project = ""              # '' disables wandb
wandb_run_name = ""
# model (see model.ModelArgs)
n_layer = 12
n_head = 12
n_kv_head = 12
n_embd = 768
block_size = 1024               # tokens per training sequence
vocab_size = 0                  # 0: the dataset's vocabulary (meta.json)
mlp_ratio = 8 / 3
rope_base = 10000.0
qk_norm = False
tie_embeddings = False
# initialisation (model.Init; not part of the model's shape: checkpoints and exports do not need it)
init_embed_std = 0.02           # the embedding's standard deviation (the head's too when tied)
init_head_std = 0.02            # the output head's
init_zero_projections = False   # o_proj and down_proj start at zero, so each block starts as the identity
# batch: sizes in sequences of block_size tokens
micro_batch_size = 8            # sequences per forward/backward on each device
batch_size = 64                 # sequences per optimizer step, over all devices and accumulation steps
batch_size_schedule = None      # dict(strategy='doubling', start_batch_size=16, interval_steps=100, max_batch_size=64)
# optimizer: AdamW, weight decay on matrices only
learning_rate = 6e-4            # peak
min_lr = 6e-5                   # the schedules end here
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
embed_lr = 0.0                  # the embedding's peak learning rate; 0: learning_rate (scaled by the same schedule)
head_lr = 0.0                   # the output head's; 0: learning_rate
norm_lr = 0.0                   # the norm gains'; 0: learning_rate
decay_embed_head = True         # weight decay on the embedding and the head too (always on the other matrices)
grad_clip = 1.0                 # max global grad norm; 0 disables clipping
max_iters = 5000                # optimizer steps
warmup_iters = 200              # linear warmup from 0, for every schedule
lr_schedule = "cosine"          # 'cosine', 'linear' or 'wsd' (warmup-stable-decay)
wsd_decay_frac = 0.2            # wsd: the last fraction of max_iters spent decaying to min_lr
wsd_decay_shape = "linear"      # wsd: 'linear', 'cosine' or 'sqrt' (1 - sqrt(progress))
# Muon (muon.py) for the hidden matrices (attention and MLP projections); the rest stays on AdamW
use_muon = False
muon_lr = 6e-4                  # peak, scaled like learning_rate; muon.py's update scale makes AdamW's LR a good one
muon_weight_decay = 0.0
muon_momentum = 0.95
muon_momentum_warmup_steps = 300  # momentum rises linearly from muon_momentum_start to muon_momentum
muon_momentum_start = 0.85
muon_momentum_cooldown_steps = 0  # and falls linearly back to muon_momentum_start over the last this many steps
muon_orthogonalize = "newton_schulz"  # or 'polar_express' (a tuned quintic per iteration)
muon_cautious_decay = False     # decay only the weights the update also moves towards zero
muon_neuron_norm = False        # NorMuon: each neuron's update divided by its running RMS (norm kept)
# system
device = "auto"                 # 'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...
dtype = "auto"                  # 'auto' (bfloat16 autocast on cuda, float32 on cpu), 'bfloat16', 'float32'
compile = None                  # torch.compile the model; None: on for cuda, off for cpu
fp8 = False                     # the blocks' matmuls in float8 (fp8.py; H100 and later): twice bf16's FLOP/s
activation_checkpointing = False  # recompute each block in the backward pass: less memory, ~1/3 more compute
loss_chunk_tokens = 4096        # the head and the loss this many tokens at a time (no full logits kept); 0: at once
data_parallel = "ddp"           # with torchrun: 'ddp', 'fsdp' (sharded: FSDP2) or 'hsdp' (sharded in groups)
ddp_bucket_mb = 250.0           # ddp: gradients all-reduced in buckets of this size; compiled, one graph per bucket
shard_size = 8                  # hsdp: ranks per sharded group (a node's GPUs); the groups replicate each other
reshard_after_forward = True    # fsdp/hsdp: free a block's gathered weights after its forward (gathered again)
peak_flops = 0.0                # device peak FLOP/s for MFU; 0: from device.PEAK_BF16_FLOPS (cuda only)
seed = 1337
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
# ----------------------------------------------------------------------------------------------

# ---- the config, checked before anything starts (before torch loads): each mistake one line -------
from infra.rundir import fail  # (torch-free, as infra/settings.py is)
from infra.settings import batch_size_problem, config_problem, schedule_batch_sizes

distributed = "RANK" in os.environ  # under torchrun, whichever the mode (DDP, FSDP2, HSDP)
rank, local_rank, world_size = (int(os.environ.get(k, default)) for k, default in
                                (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))  # as torchrun sets them
master = rank == 0  # rank 0 logs and writes every file
if problem := config_problem(config, world_size=world_size):
    fail(f"config: {problem}")
batch_sizes = schedule_batch_sizes(batch_size, batch_size_schedule, max_iters)
if problem := batch_size_problem(batch_sizes, micro_batch_size=micro_batch_size, world_size=world_size):
    fail(problem)

import torch  # after the config: --help and its mistakes answer without loading torch
import torch.distributed as dist

from data import micro_batches, open_mixture, val_split_warnings
from evaluate import evaluate_tasks, load_task, scores_line, validation, validation_line, validation_windows
from fp8 import problem as fp8_problem, use_fp8
from model import GPT, Init
from muon import Muon
import tokenizer as tok
# the machinery (infra/): where a run starts, checkpoints, the run directory, parallelism, the device
from infra.checkpoint import checkpoint_failure, wait_for_checkpoint
from infra.device import (busy_cpu_warning, device_name, device_peak_flops, peak_memory_mb, resolve_compile,
                          resolve_device)
from infra.parallel import (clip_grad_norm, compiled_step_problem, found_inf_problem, join_process_group,
                            mean_over_ranks, reshard, state_bytes, stop_agreed, sync_gradients, wrap)
from infra.resume import (Finished, Refused, load_state, model_args_for, save_training_state, shape_from_start,
                          start_counters, start_point, training_meta)
from infra.rundir import catch_stop_signals, end_run, fail_on, log, log_line, open_run_log, stop_signal

with fail_on(ValueError, prefix="config: "):
    device, device_type, dtype, autocast = resolve_device(device, dtype)
if distributed:
    device = join_process_group(device, device_type, local_rank)
if device_type == "cpu" and (warning := busy_cpu_warning()):
    log(warning)
compile, problem = resolve_compile(compile, device_type)
if problem:
    log(f"warning: compile=True needs {problem}; training uncompiled (--compile=False silences this)")


# ---- schedules --------------------------------------------------------------------------------
def lr_at(step):
    """AdamW's learning rate at a step; Muon's is muon_lr scaled by the same factor."""
    # 1) linear warmup from 0
    if step < warmup_iters:
        return learning_rate * (step + 1) / warmup_iters
    # 2) wsd: stable at the peak, then the last wsd_decay_frac of the run decays to min_lr
    if lr_schedule == "wsd":
        decay_start = max_iters - int(wsd_decay_frac * max_iters)
        if step < decay_start:
            return learning_rate
        progress = min(1.0, (step - decay_start) / max(1, max_iters - decay_start))
        remaining = {"linear": 1 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress)),
                     "sqrt": 1 - math.sqrt(progress)}[wsd_decay_shape]
        return min_lr + (learning_rate - min_lr) * remaining
    # 3) cosine or linear from the peak down to min_lr over the rest of the run
    progress = min(1.0, (step - warmup_iters) / max(1, max_iters - warmup_iters))
    if lr_schedule == "cosine":
        return min_lr + (learning_rate - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    return learning_rate + (min_lr - learning_rate) * progress


def muon_momentum_at(step):
    warmup = min(1.0, step / muon_momentum_warmup_steps) if muon_momentum_warmup_steps > 0 else 1.0
    if muon_momentum_cooldown_steps > 0:
        warmup = min(warmup, (max_iters - step) / muon_momentum_cooldown_steps)
    return muon_momentum_start + (muon_momentum - muon_momentum_start) * warmup


def batch_size_at(step):
    """Global batch (sequences) at a step. The doubling schedule grows it by raising gradient
    accumulation while the micro-batch stays fixed, so the compiled shapes never change."""
    if batch_size_schedule is None:
        return batch_size
    s = batch_size_schedule
    return min(s["max_batch_size"], s["start_batch_size"] * 2 ** (step // s["interval_steps"]))


sequences_per_micro_step = micro_batch_size * world_size


# ---- where to start from: resume, a stage handoff, or scratch (infra/resume.py: start_point) ----
try:
    start_ckpt, read_tensor, resuming = start_point(out_dir, init_from, max_iters=max_iters, use_muon=use_muon,
                                                    init_from_unfinished=init_from_unfinished, master=master,
                                                    barrier=dist.barrier if distributed else lambda: None)
except Refused as e:
    fail(str(e))
except Finished as e:
    log(str(e))
    end_run()
step, tokens_seen, parent, good_checkpoint, best_val_loss = start_counters(start_ckpt, resuming)
if differences := shape_from_start(start_ckpt, config):  # the model's shape is the start checkpoint's
    log(f"model shape from {start_ckpt['path']}, not the config: {differences}")
    config.update(differences)  # what the checkpoints and metrics.jsonl record
    block_size = config["block_size"]
# the stage before scored these weights on these tasks at its end: no need to again at step 0
tasks_scored = start_ckpt is not None and not resuming and start_ckpt.get("config", {}).get("eval_tasks") == eval_tasks


# ---- data: the windows of step s come from default_rng((seed, s)) -----------------------------------
with fail_on(FileNotFoundError, ValueError):
    datasets, mixture_weights, encoder = open_mixture(data_mixture or {data_dir: 1.0}, block_size, align_windows,
                                                      use_loss_mask=use_loss_mask)
encoder_state, meta = tok.tokenizer_state(encoder), datasets[0].meta  # checkpoints embed the tokenizer
for warning in val_split_warnings(datasets, eval_iters=eval_iters,
                                  tokens_per_eval_iter=micro_batch_size * world_size * block_size):
    log(warning)
batches = micro_batches(datasets, mixture_weights, start_step=step, batch_size_at=batch_size_at,
                        micro_batch_size=micro_batch_size, rank=rank, world_size=world_size, block_size=block_size,
                        use_loss_mask=use_loss_mask, seed=seed, device=device)


def next_batch():
    with fail_on(ValueError):  # a token id past the vocabulary: a shard edited after prepare.py
        return next(batches)


# ---- the model and its optimizers -------------------------------------------------------------
with fail_on(ValueError):
    model_args = model_args_for(start_ckpt, config, tokenizer=encoder_state, data_vocab=meta["vocab_size"],
                                data_dir=data_dir)
with torch.device("meta"):  # no memory yet: wrap gives each rank what it holds, initialised from the seed
    gpt = GPT(
        model_args,
        init=Init(embed_std=init_embed_std, head_std=init_head_std, zero_projections=init_zero_projections),
        checkpoint_blocks=activation_checkpointing,
        loss_chunk_tokens=loss_chunk_tokens,
        document_token=meta["bos_id"] if document_masking else None,
    )
if fp8 and (problem := fp8_problem(gpt, device)):
    fail(f"fp8: {problem}; or --fp8=False")
if fp8:
    use_fp8(gpt)
# gpt: the GPT module (sharded in place under FSDP2); model: what the step calls, compiled and wrapped
# (infra/parallel.py). Evaluation runs gpt uncompiled: a no-grad graph would cost more to compile than it
# saves every eval_interval.
model, muon_group = wrap(gpt, mode=data_parallel if distributed else "ddp", device=device, local_rank=local_rank,
                         world_size=world_size, shard_size=shard_size, compile=compile, bf16=dtype == "bfloat16",
                         reshard_after_forward=reshard_after_forward, seed=seed, ddp_bucket_mb=ddp_bucket_mb)


# ---- the optimizers, by name (checkpoints name their state so): AdamW, and Muon for the blocks' matrices ----
groups, summary = gpt.param_groups(  # after wrap: FSDP2 replaces the parameters
    learning_rate=learning_rate, weight_decay=weight_decay, embed_lr=embed_lr or None, head_lr=head_lr or None,
    norm_lr=norm_lr or None, decay_embed_head=decay_embed_head, use_muon=use_muon,
)
# fused: on CPU too, so it can skip a step on a device-side flag (found_inf) with no host sync
optimizers = {"adamw": torch.optim.AdamW(groups["adamw"], lr=learning_rate, betas=(beta1, beta2), fused=True)}
if use_muon:
    optimizers["muon"] = Muon(
        groups["muon"],
        lr=muon_lr,
        weight_decay=muon_weight_decay,
        momentum=muon_momentum,
        orthogonalize=muon_orthogonalize,
        cautious_decay=muon_cautious_decay,
        neuron_norm=muon_neuron_norm,
        group=muon_group,
    )
adamw, muon = optimizers["adamw"], optimizers.get("muon")
log(summary)
# the divergence guard skips a step by setting each optimizer's found_inf: one that ignores it is refused
if problem := found_inf_problem(optimizers, gpt.parameters()):
    fail(problem)
# Resuming is exact without saving any random generator's state: nothing draws from one after the
# initialisation above (no dropout), and the data is a function of the step.
if start_ckpt is not None:  # each rank reads the rows it holds
    with fail_on(ValueError):  # a weight that is not finite
        load_state(read_tensor, start_ckpt["tensors"], gpt, optimizers if resuming else {}, device)
    log(f"resumed from {good_checkpoint} at step {step}" if resuming else
        f"weights from {parent} (step {start_ckpt['step']}); fresh optimizer, step count and schedule")
    del start_ckpt, read_tensor


# ---- evaluation: the same validation windows at every evaluation, split between ranks -------------
val_windows = validation_windows(datasets, micro_batches=eval_iters, micro_batch_size=micro_batch_size,
                                 block_size=block_size, seed=seed, rank=rank, world_size=world_size,
                                 full_pass=val_full_pass)
token_bytes = torch.from_numpy(tok.token_byte_lengths(encoder)).to(device)
with fail_on(OSError, ValueError, prefix="eval_tasks: "):
    tasks = [load_task(path, examples) for path, examples in eval_tasks.items()]


# ---- the run's records: checkpoints, config.py, metrics.jsonl, the console -------------------------
def write_checkpoint(step, tokens_seen, val_loss, good_checkpoint):
    """All ranks write their share in the background while training goes on (a failed write stops the
    run at the next step); returns the new checkpoint's path (resume.save_training_state). val_loss:
    this step's evaluation, or None."""
    meta = training_meta(step=step, tokens_seen=tokens_seen, batch_size=batch_size_at(step), parent=parent,
                         model_args=asdict(model_args), config=config, tokenizer=encoder_state, data_dir=data_dir,
                         val_loss=val_loss, best_val_loss=best_val_loss)
    with fail_on(ValueError):  # weights or an evaluation that are not finite, or a run that diverged
        return save_training_state(gpt, optimizers, meta, out_dir=out_dir, val_loss=val_loss,
                                   good_checkpoint=good_checkpoint, rank=rank, world_size=world_size,
                                   keep_last=keep_last_checkpoints, keep_every=keep_every_checkpoints)


catch_stop_signals(rank)  # SIGTERM / SIGUSR1 / Ctrl-C from here on: finish the step, checkpoint, exit 0
flops_per_token, peak = gpt.flops_per_token(), peak_flops or device_peak_flops(device_type)
log("config (the rest are train.py's defaults): "
    + ", ".join(f"{k}={shown(v)}" for k, v in config.items() if v != config_defaults[k]))
log(f"model: {gpt.num_params() / 1e6:.2f}M parameters, {flops_per_token / 1e6:.1f} MFLOPs/token | data: "
    + ", ".join(f"{d.meta['splits']['train']['tokens']:,} train tokens in {d.directory}" for d in datasets)
    + f" | device {device}, {dtype}, world size {world_size}, compile={compile}, {type(model).__name__}")
x, y, loss_scale = next_batch()
# compiled, the first micro-batch runs through the compiled and the uncompiled model: a compiler that
# changes the gradients (it happens, silently) stops the run now, not after days of a flat loss
if compile:
    log("compiling the model, and checking it against the uncompiled one on one micro-batch (a minute or more)")
    if problem := compiled_step_problem(model, gpt, x, y, loss_scale, autocast=autocast,
                                        low_precision=dtype == "bfloat16" or fp8):
        fail(f"{problem}; train with --compile=False")
run_info = {"step": step, "parent": parent, "params": gpt.num_params(), "world_size": world_size,
            "device": device_name(device_type), "dtype": dtype, "compile": compile, "torch": torch.__version__}
record = open_run_log(out_dir, config, run_info, master=master, wandb_project=wandb_project,
                      wandb_run_name=wandb_run_name)  # a metrics.jsonl line (rank 0); a full disk stops the run


# ---- the loop ---------------------------------------------------------------------------------
start_step = step
# divergence guard, on the device: the count of non-finite steps in a row and in all
bad_in_a_row = torch.zeros((), device=device, dtype=torch.int64)
bad_total = torch.zeros((), device=device, dtype=torch.int64)
run_started = last_log_time = time.time()
last_log_step, last_log_tokens = step, tokens_seen
val_loss = None  # the newest evaluation's
while True:
    last_step = step >= max_iters

    # once in a while: evaluate (not again where a resumed run starts: it was, before its checkpoint), and checkpoint
    if (step % eval_interval == 0 or last_step) and not (resuming and step == start_step):
        paused = time.time()
        with torch.compiler.set_stance("force_eager"):  # uncompiled, FSDP2's blocks too (compiled in place)
            if eval_iters > 0:
                with fail_on(ValueError):  # a token id past the vocabulary in a val shard edited after prepare.py
                    per_dataset, (val_loss, val_bpb) = validation(
                        gpt, datasets, val_windows, weights=mixture_weights, block_size=block_size,
                        token_bytes=token_bytes, device=device, autocast=autocast)
                by_dataset = {name: {"loss": loss, "bpb": bpb} for name, (loss, bpb) in per_dataset.items()}
                log(f"step {step}: {validation_line(val_loss, val_bpb, by_dataset)}")
                record({"step": step, "val_loss": val_loss, "val_bpb": val_bpb, "tokens": tokens_seen,
                        "val_by_dataset": by_dataset})
            if tasks and not (tasks_scored and step == start_step):
                if step == start_step:  # the first scoring can take a minute or more on a CPU: say so
                    log(f"step {step}: scoring {len(tasks)} tasks ({sum(len(t['examples']) for t in tasks):,} "
                        f"examples)...")
                scores = evaluate_tasks(gpt, encoder, tasks, block_size=block_size,
                                        micro_batch_size=micro_batch_size, device=device, autocast=autocast,
                                        rank=rank, world_size=world_size)
                log(f"step {step}: tasks ({time.time() - paused:.1f}s with validation) | {scores_line(scores)}")
                record({"step": step, "tokens": tokens_seen, "tasks": scores})
        reshard(gpt)  # under FSDP2, the weights evaluation gathered back into shards (infra/parallel.py)
        if step > start_step:
            good_checkpoint = write_checkpoint(step, tokens_seen, val_loss if eval_iters > 0 else None,
                                               good_checkpoint)
        if eval_iters > 0:  # the run's best, after its checkpoint was judged against the best before it
            best_val_loss = val_loss if best_val_loss is None else min(best_val_loss, val_loss)
        last_log_time += time.time() - paused  # the time evaluating and checkpointing is not training time
    if last_step:
        break

    # the step: set the schedules, accumulate gradients over the micro-batches, clip, update
    lr = lr_at(step)
    for group in adamw.param_groups:
        group["lr"] = lr * group["lr_scale"]
    if muon is not None:
        for group in muon.param_groups:
            group["lr"] = muon_lr * lr / learning_rate
            group["momentum"] = muon_momentum_at(step)
    accum_steps = batch_size_at(step) // sequences_per_micro_step
    loss_sum = torch.zeros((), device=device)  # accumulated on the device: no host sync per micro-step
    for micro_step in range(accum_steps):
        if distributed:  # the gradients of the whole step cross ranks on the last micro-step (infra/parallel.py)
            sync_gradients(model, micro_step == accum_steps - 1)
        with autocast:
            loss = model(x, y, loss_reduction="sum") * loss_scale
        x, y, loss_scale = next_batch()  # the next batch is prepared while the device works on this one
        loss.backward()
        loss_sum += loss.detach()
    grad_norm = clip_grad_norm(gpt.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    # a non-finite loss gives non-finite (all-reduced, so the same on every rank) gradients: then
    # every optimizer skips the step on this flag, with no host sync
    bad = ~torch.isfinite(grad_norm)
    for opt in optimizers.values():
        opt.found_inf = bad.float()
        opt.step()
    if step == start_step:  # with the gradients and the optimizer state all there: what each rank holds
        state_mb = state_bytes(gpt, optimizers) / 2**20
    gpt.zero_grad(set_to_none=True)
    bad_in_a_row = (bad_in_a_row + 1) * bad
    bad_total += bad
    tokens_seen += batch_size_at(step) * block_size
    step += 1

    # every log_interval steps: the only host syncs, the log line and a metrics.jsonl record
    if step % log_interval == 0 or step == max_iters:
        loss_value = mean_over_ranks(loss_sum)
        if bad_in_a_row.item() >= max_bad_steps:
            fail(f"the loss or gradients were not finite for {bad_in_a_row.item()} steps in a row (to step {step}), "
                 f"and none of those steps was applied; the newest good checkpoint is "
                 f"{good_checkpoint or 'none (nothing was written)'}: resume from it with a lower learning rate")
        if last_log_step == start_step and grad_norm.item() == 0 and loss_value != 0:  # (a loss of 0: no target)
            fail(f"the gradient norm is exactly 0 at step {step} while the loss is {loss_value:.4g}: nothing is "
                 f"learning; a compiler fault (try --compile=False) or weights that are all zero")
        now = time.time()
        elapsed, steps_done = now - last_log_time, step - last_log_step
        eta = (now - run_started) / (step - start_step) * (max_iters - step)  # evaluations included
        tokens_per_s = (tokens_seen - last_log_tokens) / elapsed
        metrics = {"step": step, "loss": loss_value, "lr": lr, "batch_size": batch_size_at(step - 1),
                   "grad_accum": accum_steps, "grad_norm": grad_norm.item(), "skipped_steps": bad_total.item(),
                   "tokens": tokens_seen, "tokens_per_s": tokens_per_s,
                   "tokens_per_s_per_device": tokens_per_s / world_size, "ms_per_step": 1000 * elapsed / steps_done,
                   "peak_memory_mb": peak_memory_mb(device), "state_mb_per_rank": state_mb}
        if muon is not None:
            metrics["muon_momentum"] = muon.param_groups[0]["momentum"]
        if peak:
            metrics["mfu"] = flops_per_token * tokens_per_s / (peak * world_size)
        log(log_line(metrics, max_iters=max_iters, elapsed_s=now - run_started, eta_s=eta))
        record(metrics)
        last_log_time, last_log_step, last_log_tokens = now, step, tokens_seen

    # a checkpoint written in the background that failed: stop now, not at the next checkpoint
    if (error := checkpoint_failure()) is not None:
        fail(str(error))

    # on a stop signal: all ranks must stop at the same step, so they agree (a collective) on log steps
    stop = stop_agreed(stop_signal() is not None, at_log_step=step % log_interval == 0, device=device)
    if stop and step < max_iters:
        log(f"stopping at step {step} on a signal")
        write_checkpoint(step, tokens_seen, None, good_checkpoint)  # no evaluation at this step
        break

with fail_on(OSError):  # the last checkpoint, written in the background
    wait_for_checkpoint()
end_run()
