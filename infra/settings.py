"""
train.py's settings, checked before anything starts. Each function returns the first mistake as
one line that says what was wrong and what to use instead, or None; train.py prints it and exits 1.
"""
import importlib.util
import math

SCHEDULES = ("cosine", "linear", "wsd")
WSD_DECAY_SHAPES = ("linear", "cosine", "sqrt")
ORTHOGONALIZERS = ("newton_schulz", "polar_express")  # muon.ORTHOGONALIZERS' keys, named here without torch
MODES = ("ddp", "fsdp", "hsdp")  # data_parallel: infra/parallel.py
BATCH_SCHEDULE_KEYS = {"strategy", "start_batch_size", "interval_steps", "max_batch_size"}


def config_problem(c, *, world_size):
    """The first mistake in train.py's config c (a dict of every setting), or None."""
    for name, choices in [("lr_schedule", SCHEDULES), ("wsd_decay_shape", WSD_DECAY_SHAPES),
                          ("muon_orthogonalize", ORTHOGONALIZERS), ("data_parallel", MODES),
                          ("val_full_pass", (True, False, None))]:
        if c[name] not in choices:
            return f"{name} must be one of {', '.join(map(repr, choices))}, got {c[name]!r}"
    for name in ("learning_rate", "muon_lr") if c["use_muon"] else ("learning_rate",):
        if not 0 < c[name] < math.inf:
            return f"{name} must be a finite number > 0, got {c[name]}"
    for name in ("min_lr", "embed_lr", "head_lr", "norm_lr", "init_embed_std", "init_head_std"):
        if not 0 <= c[name] < math.inf:
            return f"{name} must be a finite number >= 0, got {c[name]}"
    if not 0 < c["ddp_bucket_mb"] < math.inf:
        return f"ddp_bucket_mb must be a finite number > 0, got {c['ddp_bucket_mb']}"
    for name, low, high in [("beta1", 0, 1), ("beta2", 0, 1), ("muon_momentum", 0, 1), ("muon_momentum_start", 0, 1)]:
        if not low <= c[name] < high:
            return f"{name} must be in [{low}, {high}), got {c[name]}"
    for name in ("weight_decay", "muon_weight_decay", "grad_clip"):
        if not 0 <= c[name] < math.inf:
            return f"{name} must be a finite number >= 0, got {c[name]}"
    if not 0 <= c["wsd_decay_frac"] <= 1:
        return f"wsd_decay_frac must be in [0, 1], got {c['wsd_decay_frac']}"
    if c["min_lr"] > c["learning_rate"]:
        return f"min_lr={c['min_lr']} is above learning_rate={c['learning_rate']}: the schedules decay to min_lr"
    s = c["batch_size_schedule"]
    whole = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1  # noqa: E731
    if s is not None and not (isinstance(s, dict) and set(s) == BATCH_SCHEDULE_KEYS and s["strategy"] == "doubling"
                              and all(whole(s[k]) for k in BATCH_SCHEDULE_KEYS - {"strategy"})
                              and s["max_batch_size"] >= s["start_batch_size"]):
        return (f"batch_size_schedule must be dict(strategy='doubling', start_batch_size=..., interval_steps=..., "
                f"max_batch_size=...) with whole numbers >= 1 and max_batch_size >= start_batch_size, got {s!r}")
    if c["data_parallel"] == "hsdp" and world_size % c["shard_size"] != 0:
        return f"hsdp needs a world size ({world_size}) that is a multiple of shard_size ({c['shard_size']})"
    for name in ("micro_batch_size", "batch_size", "eval_interval", "log_interval", "max_bad_steps", "block_size"):
        if c[name] < 1:
            return f"{name} must be at least 1, got {c[name]}"
    for name in ("max_iters", "warmup_iters", "eval_iters", "keep_last_checkpoints", "keep_every_checkpoints",
                 "muon_momentum_warmup_steps", "muon_momentum_cooldown_steps", "loss_chunk_tokens"):
        if c[name] < 0:
            return f"{name} must not be negative, got {c[name]}"
    if c["wandb_project"] and importlib.util.find_spec("wandb") is None:
        return ("wandb_project is set, but wandb is not installed: pip install wandb, or leave wandb_project empty "
                "(out_dir/metrics.jsonl has every logged number either way)")
    return None


def schedule_batch_sizes(batch_size, schedule, max_iters):
    """Every global batch size a run uses: batch_size, or the doubling schedule's sizes up to its max
    (or up to where max_iters ends it), without a loop over the steps."""
    if schedule is None:
        return {batch_size}
    sizes, size, step = set(), schedule["start_batch_size"], 0
    while step <= max_iters and size < schedule["max_batch_size"]:
        sizes.add(size)
        size, step = 2 * size, step + schedule["interval_steps"]
    return sizes | ({schedule["max_batch_size"]} if step <= max_iters else set())


def sample_problem(c):
    """The first mistake in sample.py's settings c, or None."""
    if not 0 <= c["temperature"] < math.inf:
        return f"temperature must be a finite number >= 0 (0: greedy), got {c['temperature']}"
    for name in ("top_k", "max_new_tokens"):
        if c[name] < 0:
            return f"{name} must not be negative, got {c[name]}"
    if c["num_samples"] < 1:
        return f"num_samples must be at least 1, got {c['num_samples']}"
    return None


def batch_size_problem(sizes, *, micro_batch_size, world_size):
    """A global batch size (of those a run uses) that the micro-batches on all ranks cannot add up to, or None."""
    per_micro_step = micro_batch_size * world_size
    for size in sorted(sizes):
        if size <= 0 or size % per_micro_step:
            below = max(1, size // per_micro_step) * per_micro_step
            above = (size // per_micro_step + 1) * per_micro_step
            return (f"batch size {size} is not a multiple of micro_batch_size x world_size = {micro_batch_size} x "
                    f"{world_size} = {per_micro_step}; use e.g. {' or '.join(map(str, sorted({below, above})))}")
    return None
