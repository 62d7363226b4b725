"""Exact resume, crashes at any instant, preemption, stage handoff and the divergence guard."""
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from infra.checkpoint import checkpoint_paths, load_checkpoint
from conftest import HANG_S, ROOT, TORCHRUN, assert_same_state, one_line_error, records, train

TINY = ["tests/tiny_model.py", "--eval_iters=1", "--log_interval=1", "--micro_batch_size=4", "--learning_rate=1e-2",
        "--warmup_iters=2"]
# the batch doubles at steps 4 and 8: a stop at step 6 and the end at 12 fall in different phases
SCHEDULE = (
    "--batch_size_schedule={'strategy': 'doubling', 'start_batch_size': 4, 'interval_steps': 4, 'max_batch_size': 16}"
)

# every recipe setting that is off by default, on at once
RECIPE = ["--use_muon=True", "--muon_lr=1e-2", "--muon_orthogonalize=polar_express", "--muon_weight_decay=0.1",
          "--muon_cautious_decay=True", "--muon_neuron_norm=True", "--muon_momentum_cooldown_steps=4",
          "--init_zero_projections=True", "--init_head_std=0.001", "--embed_lr=2e-2", "--head_lr=5e-3",
          "--norm_lr=1e-2", "--decay_embed_head=False", "--align_windows=True", "--document_masking=True",
          "--qk_norm=True", "--lr_schedule=wsd", "--wsd_decay_shape=sqrt"]


@pytest.mark.parametrize("variant", [[], ["--use_muon=True", "--muon_lr=1e-2"], ["mixture"], RECIPE],
                         ids=["adamw", "muon", "mixture", "recipe"])
def test_resume_is_bit_identical(data, tmp_path, variant):
    if variant == ["mixture"]:  # text and chat, the chat part learned on the assistant's words only
        variant = [f"--data_mixture={{'{data}': 0.5, '{data}-chat': 0.5}}", "--use_loss_mask=True"]
    args = [*TINY, *variant, SCHEDULE, f"--data_dir={data}", "--max_iters=12", "--eval_interval=6"]
    train(*args, f"--out_dir={tmp_path}/full")
    os.makedirs(tmp_path / "resumed")  # the same run, stopped after step 6
    shutil.copytree(tmp_path / "full" / "ckpt_0000006", tmp_path / "resumed" / "ckpt_0000006")
    train(*args, f"--out_dir={tmp_path}/resumed", "--init_from=resume")
    full, resumed = load_checkpoint(str(tmp_path / "full")), load_checkpoint(str(tmp_path / "resumed"))
    assert full["step"] == resumed["step"] == 12 and full["tokens_seen"] == resumed["tokens_seen"]
    assert_same_state(full, resumed)
    full_losses, resumed_losses = records(tmp_path / "full"), records(tmp_path / "resumed")
    assert sorted(resumed_losses) == list(range(7, 13))
    assert all(resumed_losses[s] == full_losses[s] for s in range(7, 13))


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_on_another_world_size(data, tmp_path, optimizer):
    # with Muon each rank holds a share of the momentum; the checkpoint holds all of it
    args = [*TINY, "--batch_size=8", f"--data_dir={data}", "--max_iters=12", "--eval_interval=6",
            *(["--use_muon=True", "--muon_lr=1e-2"] if optimizer == "muon" else [])]
    train(*args, f"--out_dir={tmp_path}/two", launcher=TORCHRUN)
    train(*args, f"--out_dir={tmp_path}/one", "--max_iters=12")
    # the state a 2-process run saves is the whole state: the same tensors a 1-process run saves
    two_half, one_half = (
        load_checkpoint(str(tmp_path / "two/ckpt_0000006")),
        load_checkpoint(str(tmp_path / "one/ckpt_0000006")),
    )
    assert_same_state(two_half, one_half, exact=False)
    os.makedirs(tmp_path / "resumed")
    shutil.copytree(tmp_path / "two" / "ckpt_0000006", tmp_path / "resumed" / "ckpt_0000006")
    result = train(*args, f"--out_dir={tmp_path}/resumed", "--init_from=resume")
    assert "resumed from" in result.stdout and "world size 1" in result.stdout
    assert_same_state(load_checkpoint(str(tmp_path / "two")), load_checkpoint(str(tmp_path / "resumed")), exact=False)
    # and the other way: one process's checkpoint resumed on two
    os.makedirs(tmp_path / "resumed_on_two")
    shutil.copytree(tmp_path / "one" / "ckpt_0000006", tmp_path / "resumed_on_two" / "ckpt_0000006")
    result = train(*args, f"--out_dir={tmp_path}/resumed_on_two", "--init_from=resume", launcher=TORCHRUN)
    assert "resumed from" in result.stdout and "world size 2" in result.stdout
    assert_same_state(
        load_checkpoint(str(tmp_path / "one")), load_checkpoint(str(tmp_path / "resumed_on_two")), exact=False
    )


@pytest.mark.slow
def test_killed_at_random_moments_ends_bit_identical(data, tmp_path):
    args = [*TINY, "--batch_size=8", f"--data_dir={data}", "--max_iters=120", "--eval_interval=2",
            "--keep_last_checkpoints=2"]
    train(*args, f"--out_dir={tmp_path}/reference")
    out_dir = tmp_path / "killed"
    command = [sys.executable, "train.py", *args, f"--out_dir={out_dir}", "--init_from=resume"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(0)
    kills, kills_during_write = 0, 0
    for attempt in range(80):
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        if attempt % 2 == 0:  # kill the moment a checkpoint write is under way
            while process.poll() is None and not glob.glob(str(out_dir / "*.tmp")):
                time.sleep(0.0005)
            during_write = process.poll() is None
        else:  # or at a random moment
            time.sleep(rng.uniform(1.0, 3.0))  # a whole run takes about 4 s here
            during_write = False
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
            kills_during_write += during_write
        if kills >= 6 and kills_during_write >= 2:
            break
    assert kills >= 6 and kills_during_write >= 2
    finish = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=HANG_S)
    assert finish.returncode == 0, finish.stderr[-3000:]
    assert_same_state(load_checkpoint(str(tmp_path / "reference")), load_checkpoint(str(out_dir)))
    assert [os.path.basename(p) for p in checkpoint_paths(str(out_dir))] == ["ckpt_0000118", "ckpt_0000120"]
    assert not glob.glob(str(out_dir / "*.tmp"))


def test_sigterm_checkpoints_the_current_step_and_exits_zero(data, tmp_path):
    command = [sys.executable, "train.py", *TINY, "--batch_size=4", f"--data_dir={data}", f"--out_dir={tmp_path}",
               "--max_iters=100000", "--eval_interval=100000"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (tmp_path / "metrics.jsonl").exists() or len(records(tmp_path)) < 3:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    last_step = max(records(tmp_path))
    assert [os.path.basename(p) for p in checkpoint_paths(str(tmp_path))] == [f"ckpt_{last_step:07d}"]
    assert f"stopping at step {last_step} on a signal" in stdout and "SIGTERM" in stderr


@pytest.mark.slow
def test_stage_handoff_takes_weights_only_and_checks_the_vocabulary(data, other_data, tmp_path):
    train(*TINY, "--batch_size=8", f"--data_dir={data}", f"--out_dir={tmp_path}/pretrain", "--max_iters=20",
          "--eval_interval=20")
    # a later stage: its own config need not repeat the model shape
    result = train("--device=cpu", "--compile=False", "--eval_iters=1", "--log_interval=1", "--micro_batch_size=4",
                   "--batch_size=4", f"--data_dir={data}", f"--out_dir={tmp_path}/midtrain", "--max_iters=4",
                   "--eval_interval=4", f"--init_from={tmp_path}/pretrain", "--warmup_iters=2")
    assert "fresh optimizer, step count and schedule" in result.stdout
    pretrain, midtrain = load_checkpoint(str(tmp_path / "pretrain")), load_checkpoint(str(tmp_path / "midtrain"))
    assert midtrain["step"] == 4 and midtrain["parent"] == pretrain["path"]
    assert midtrain["optimizers"]["adamw"]["embed_tokens.weight"]["step"].item() == 4  # a fresh AdamW
    pretrain_losses = records(tmp_path / "pretrain")
    # it starts where pretraining ended, not from a fresh initialisation
    assert records(tmp_path / "midtrain")[1] < pretrain_losses[1] - 0.5
    assert abs(records(tmp_path / "midtrain")[1] - pretrain_losses[20]) < 0.5
    result = train(*TINY, f"--data_dir={other_data}", f"--out_dir={tmp_path}/bad", f"--init_from={tmp_path}/pretrain",
                   check=False)
    # two BPEs of 512 tokens: told apart by their merges, and the likely mistake (--init_from) named first
    line = one_line_error(result)
    assert f"{tmp_path}/pretrain/ckpt_0000020 was trained with another tokenizer" in line, line
    assert "512 tokens, merges" in line and "name yours with --init_from" in line and f"--tokenizer={data}" in line
    assert "vocabulary 512 differs from vocabulary 512" not in line
    assert not os.path.exists(tmp_path / "bad" / "ckpt_0000001")
    # the same check for a mixture: its datasets must share one tokenizer
    mixture = "--data_mixture={'%s': 0.5, '%s': 0.5}" % (data, other_data)
    result = train(*TINY, mixture, f"--out_dir={tmp_path}/mixed", check=False)
    assert result.returncode != 0 and "use different tokenizers" in result.stderr


def test_non_finite_steps_are_skipped_then_the_run_stops(data, tmp_path):
    args = [*TINY, "--batch_size=4", f"--data_dir={data}", "--max_iters=12", "--eval_interval=4"]
    train(*args, f"--out_dir={tmp_path}/once", script="tests/nan_loss.py", env={"NAN_CALLS": "6"})
    with open(tmp_path / "once" / "metrics.jsonl") as f:
        records = [r for r in map(json.loads, f) if "loss" in r]
    assert [r["skipped_steps"] for r in records] == [0] * 5 + [1] * 7
    assert all(torch.isfinite(t).all() for t in load_checkpoint(str(tmp_path / "once"))["model"].values())

    result = train(*args, f"--out_dir={tmp_path}/diverged", "--max_bad_steps=3", script="tests/nan_loss.py",
                   env={"NAN_FROM": "6"}, check=False)
    assert result.returncode != 0
    assert "not finite for 3 steps in a row" in result.stderr
    # the checkpoint at step 4 is the last: nothing written after the loss went bad
    assert [os.path.basename(p) for p in checkpoint_paths(str(tmp_path / "diverged"))] == ["ckpt_0000004"]

    # a loss to learn from and every gradient exactly zero (a compiler fault): the first log step stops the run
    result = train(*args, f"--out_dir={tmp_path}/zero", script="tests/nan_loss.py",
                   env={"NAN_FROM": "1", "ZERO_GRAD": "1"}, check=False)
    assert "the gradient norm is exactly 0 at step 1 while the loss is" in one_line_error(result)
    assert not checkpoint_paths(str(tmp_path / "zero"))
