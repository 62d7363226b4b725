"""
train.py's settings, checked before anything starts. Each function returns the first mistake as
one line that says what was wrong and what to use instead, or None; train.py prints it and exits 1.
"""
import importlib.util
import math

SCHEDULES = ("cosine", "linear", "wsd")
WSD_DECAY_SHAPES = ("linear", "cosine", "sqrt")
ORTHOGONALIZERS = ("newton_schulz", "polar_express")  # muon.ORTHOGONALIZERS' keys, named here without torch
BATCH_SCHEDULE_KEYS = {"strategy", "start_batch_size", "interval_steps", "max_batch_size"}


def config_problem(c, *, world_size, modes):
    """The first mistake in train.py's config c (a dict of every setting), or None."""
    for name, choices in [("lr_schedule", SCHEDULES), ("wsd_decay_shape", WSD_DECAY_SHAPES),
                          ("muon_orthogonalize", ORTHOGONALIZERS), ("data_parallel", modes),
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
    s = c["batch_size_schedule"]
    if s is not None and not (isinstance(s, dict) and set(s) == BATCH_SCHEDULE_KEYS and s["strategy"] == "doubling"
                              and s["interval_steps"] >= 1):
        return (f"batch_size_schedule must be dict(strategy='doubling', start_batch_size=..., interval_steps=..., "
                f"max_batch_size=...), got {s!r}")
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
