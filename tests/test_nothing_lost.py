"""A run's own commands never destroy it: a resume below its step, a tool pointed at a run, an
interrupted pipeline, a checkpoint corrupt twice or holding NaN bytes, a stage handoff from a stage
that has not finished, and settings that cannot build a model. Each is refused in one line (or
ends at once), and the run's files stay exactly as they were."""
import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

import infra.checkpoint as checkpoint
from infra.checkpoint import checkpoint_paths, load_checkpoint
from conftest import ROOT, TINY_RUN as TINY, one_line_error, run_script, snapshot


def copy_of(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def test_resuming_at_or_below_the_checkpoints_step_never_writes(finished, data, tmp_path):
    run = copy_of(finished, tmp_path)
    before = snapshot(run)
    args = [*TINY, f"--data_dir={data}", f"--out_dir={run}", "--init_from=resume", "--eval_interval=4"]
    for max_iters in (4, 0):  # below the newest checkpoint (step 8): refused, nothing written
        error = one_line_error(run_script("train.py", *args, f"--max_iters={max_iters}", check=False, timeout=300))
        assert f"is at step 8, past max_iters={max_iters}" in error and "--max_iters=8" in error
        assert snapshot(run) == before
    result = run_script("train.py", *args, "--max_iters=8", timeout=300)  # finished: ends at once
    assert "is finished" in result.stdout and snapshot(run) == before


@pytest.mark.slow
def test_prepare_and_export_never_replace_a_directory_they_did_not_write(finished, data, tmp_path):
    run = copy_of(finished, tmp_path)
    before = snapshot(run)
    (tmp_path / "docs").mkdir()
    for i in range(20):
        (tmp_path / "docs" / f"{i}.txt").write_text(f"Some words to make dataset {i} of. " * 50)
    error = one_line_error(run_script("prepare.py", str(tmp_path / "docs"), f"--out={run}", "--tokenizer=bytes",
                                      "--val_fraction=0.5", check=False))
    assert f"{run} is not a dataset prepare.py wrote (it holds ckpt_0000004, ckpt_0000008" in error
    error = one_line_error(run_script("export_hf.py", f"--ckpt={run}", f"--hf_dir={run}", check=False))
    assert f"{run} is not a Hugging Face export" in error
    assert snapshot(run) == before
    # what each tool wrote itself, or an empty directory, it replaces
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "empty"):
        run_script("prepare.py", str(tmp_path / "docs"), f"--out={out}", "--tokenizer=bytes", "--val_fraction=0.5")
    for hf in (tmp_path / "hf", tmp_path / "hf"):
        run_script("export_hf.py", f"--ckpt={run}", f"--hf_dir={hf}")
    assert (tmp_path / "empty" / "meta.json").exists() and (tmp_path / "hf" / "config.json").exists()
    # a file where a directory is wanted
    (tmp_path / "file").write_text("mine")
    assert "exists and is not a directory" in one_line_error(
        run_script("export_hf.py", f"--ckpt={run}", f"--hf_dir={tmp_path}/file", check=False))
    assert (tmp_path / "file").read_text() == "mine"
    # a backup beside the output (hf.old, empty.tmp) is the user's: refused, never deleted
    shutil.copytree(tmp_path / "hf", tmp_path / "hf.old")
    (tmp_path / "empty.tmp").mkdir()
    (tmp_path / "empty.tmp" / "notes.txt").write_text("mine")
    backups = snapshot(tmp_path / "hf.old"), snapshot(tmp_path / "empty.tmp")
    error = one_line_error(run_script("export_hf.py", f"--ckpt={run}", f"--hf_dir={tmp_path}/hf", check=False))
    assert f"{tmp_path}/hf.old exists and was not left by export_hf.py" in error
    error = one_line_error(run_script("prepare.py", str(tmp_path / "docs"), f"--out={tmp_path}/empty",
                                      "--tokenizer=bytes", "--val_fraction=0.5", check=False))
    assert f"{tmp_path}/empty.tmp exists and was not left by prepare.py" in error
    assert (snapshot(tmp_path / "hf.old"), snapshot(tmp_path / "empty.tmp")) == backups
    # a leftover of the tool's own (an export killed half-way) is its to delete
    shutil.rmtree(tmp_path / "hf.old")
    (tmp_path / "hf.tmp").mkdir()
    (tmp_path / "hf.tmp" / ".owner").write_text("export_hf.py\n")
    run_script("export_hf.py", f"--ckpt={run}", f"--hf_dir={tmp_path}/hf")
    assert not (tmp_path / "hf.tmp").exists() and not (tmp_path / "hf.old").exists()


def test_two_writers_of_one_output_never_mix(tmp_path):
    # a prepare.py (or an export) already writing data/x: a second one is refused, naming its PID
    import fcntl
    (tmp_path / "docs").mkdir()
    for i in range(10):
        (tmp_path / "docs" / f"{i}.txt").write_text(f"Some words of document {i}. " * 100)
    (tmp_path / "x").mkdir()
    with open(tmp_path / "x" / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242\n")
        held.flush()
        result = run_script("prepare.py", str(tmp_path / "docs"), f"--out={tmp_path}/x", "--tokenizer=bytes",
                            "--val_fraction=0.5", check=False)
    assert f"{tmp_path}/x is being written by another process (PID 4242)" in one_line_error(result)
    assert os.listdir(tmp_path / "x") == [".lock"] and not (tmp_path / "x.tmp").exists()
    run_script("prepare.py", str(tmp_path / "docs"), f"--out={tmp_path}/x", "--tokenizer=bytes", "--val_fraction=0.5")
    assert (tmp_path / "x" / "meta.json").exists()


@pytest.mark.slow
def test_convert_tasks_and_evaluate_never_replace_a_file_they_did_not_write(finished, tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    arc = [{"question": "What is 2+2?", "choices": {"text": ["3", "4"], "label": ["A", "B"]}, "answerKey": "B"}]
    pq.write_table(pa.Table.from_pylist(arc), tmp_path / "arc.parquet")
    run = copy_of(finished, tmp_path)
    before = snapshot(run)
    # a run's history; a checkpoint's meta.json (the task's options file is OUT with .json)
    for out, hit in ((f"{run}/metrics.jsonl", f"{run}/metrics.jsonl"),
                     (f"{run}/ckpt_0000008/meta.jsonl", f"{run}/ckpt_0000008/meta.json")):
        error = one_line_error(run_script("convert_tasks.py", str(tmp_path / "arc.parquet"), "--benchmark=arc",
                                          f"--out={out}", check=False))
        assert f"{hit} exists and is not a task file convert_tasks.py wrote" in error
    error = one_line_error(run_script("evaluate.py", f"--ckpt={run}", "--tasks=", f"--out_file={run}/metrics.jsonl",
                                      check=False))
    assert f"{run}/metrics.jsonl exists and is not a scores file evaluate.py wrote" in error
    assert snapshot(run) == before
    # an earlier scores file it replaces
    (tmp_path / "scores.json").write_text(json.dumps({"checkpoint": "old", "step": 0, "tasks": {}}))
    run_script("evaluate.py", f"--ckpt={run}", "--tasks=", f"--out_file={tmp_path}/scores.json")
    assert json.loads((tmp_path / "scores.json").read_text())["step"] == 8


@pytest.mark.slow
def test_a_handoff_starts_only_from_a_finished_stage(finished, data, tmp_path):
    unfinished = tmp_path / "unfinished"  # a pretrain stopped at step 4 of its 8
    os.makedirs(unfinished)
    shutil.copytree(finished / "ckpt_0000004", unfinished / "ckpt_0000004")
    args = [*TINY, f"--data_dir={data}", "--max_iters=2", "--eval_interval=2"]
    error = one_line_error(run_script("train.py", *args, f"--init_from={unfinished}", f"--out_dir={tmp_path}/mid",
                                      check=False))
    assert "stopped at step 4 of its max_iters=8: finish that stage first" in error
    assert not checkpoint_paths(str(tmp_path / "mid"))
    run_script(
        "train.py", *args, f"--init_from={unfinished}", f"--out_dir={tmp_path}/mid", "--init_from_unfinished=True"
    )
    run_script("train.py", *args, f"--init_from={finished}", f"--out_dir={tmp_path}/mid2")
    assert load_checkpoint(str(tmp_path / "mid2"))["parent"] == str(finished / "ckpt_0000008")


@pytest.mark.slow
def test_a_checkpoint_corrupt_again_is_set_aside_under_a_new_name_and_never_restarts_from_scratch(
    finished, data, tmp_path
):
    run = copy_of(finished, tmp_path)
    shutil.copytree(run / "ckpt_0000008", run / "ckpt_0000008.corrupt")  # set aside by an earlier crash
    (run / "ckpt_0000008" / "rank-00000.safetensors").write_bytes(b"garbage")
    args = [*TINY, f"--data_dir={data}", f"--out_dir={run}", "--init_from=resume", "--eval_interval=4"]
    result = run_script("train.py", *args, "--max_iters=8")
    assert "resumed from" in result.stdout and "ckpt_0000004" in result.stdout
    assert (run / "ckpt_0000008.corrupt").is_dir() and (run / "ckpt_0000008.corrupt-2").is_dir()
    assert load_checkpoint(str(run))["step"] == 8  # trained again from step 4
    # every checkpoint corrupt: the first start says so, and so does every one after it
    for path in checkpoint_paths(str(run)):
        (tmp_path / "run" / os.path.basename(path) / "meta.json").write_text("{")
    first = one_line_error(run_script("train.py", *args, "--max_iters=8", check=False))
    assert "could be loaded" in first
    before = snapshot(run)
    again = one_line_error(run_script("train.py", *args, "--max_iters=8", check=False))
    assert "holds no checkpoint that loads, only ones set aside as corrupt" in again
    assert snapshot(run) == before
    for init_from in ("scratch",):  # nor does a start from scratch train over it
        assert "set aside as corrupt" in one_line_error(
            run_script("train.py", *args[:-2], f"--out_dir={run}", f"--init_from={init_from}", check=False))


@pytest.mark.slow
def test_a_checkpoint_with_non_finite_weights_is_corrupt(finished, data, tmp_path):
    run = copy_of(finished, tmp_path)
    meta = json.loads((run / "ckpt_0000008" / "meta.json").read_text())
    from safetensors.torch import load_file
    from conftest import rewrite_checkpoint_file
    path = run / "ckpt_0000008" / "rank-00000.safetensors"
    tensors = load_file(path)
    name = next(n for n in tensors if n.startswith("model/layers.0."))
    tensors[name].view(-1)[0] = float("nan")
    rewrite_checkpoint_file(path, tensors)  # (its checksum matches: the NaN is what was written)
    assert "not finite" in one_line_error(run_script("evaluate.py", f"--ckpt={run / 'ckpt_0000008'}", check=False))
    with pytest.raises(ValueError, match="not finite"):
        load_checkpoint(str(run / "ckpt_0000008"))
    result = run_script("train.py", *TINY, f"--data_dir={data}", f"--out_dir={run}", "--init_from=resume",
                        "--max_iters=8", "--eval_interval=4")
    assert "ckpt_0000004" in result.stdout.split("resumed from")[1].splitlines()[0]
    assert (run / "ckpt_0000008.corrupt").is_dir() and meta["step"] == 8


@pytest.mark.slow
def test_settings_that_cannot_build_a_model_are_one_line_errors(data, tmp_path):
    args = [*TINY, f"--data_dir={data}", f"--out_dir={tmp_path}/out", "--max_iters=2"]
    for setting, message in [
        ("--n_head=0", "n_head must be at least 1"),
        ("--n_kv_head=0", "n_kv_head must be at least 1"),
        ("--n_embd=-64", "n_embd must be at least 1"),
        ("--n_embd=0", "n_embd must be at least 1"),
        ("--n_layer=0", "n_layer must be at least 1"),
        ("--mlp_ratio=-1.0", "mlp_ratio must be a finite number > 0"),
        (f"--data_mixture={{'{data}': 1e400}}", "finite positive weight"),
    ]:
        assert message in one_line_error(run_script("train.py", *args, setting, check=False))
    assert not checkpoint_paths(str(tmp_path / "out"))
    # the lock is released on every exit: the next run takes no "lock of an earlier run" over
    assert (tmp_path / "out" / ".lock").read_text() == ""
    assert "taking over" not in run_script("train.py", *args, "--eval_interval=2").stdout


@pytest.mark.slow
def test_unusable_paths_and_config_files_are_one_line_errors(finished, data, tmp_path):
    (tmp_path / "a_file").write_text("mine")
    args = [*TINY, f"--data_dir={data}", "--max_iters=2"]
    error = one_line_error(run_script("train.py", *args, f"--out_dir={tmp_path}/a_file", check=False))
    assert f"cannot use {tmp_path}/a_file as the run directory" in error and (tmp_path / "a_file").read_text() == "mine"
    unwritable = "/proc/self/no_such_run"  # not writable, even as root
    assert "cannot use /proc/self/no_such_run" in one_line_error(
        run_script("train.py", *args, f"--out_dir={unwritable}", check=False))
    assert "cannot write /proc/self/no_such_export" in one_line_error(
        run_script("export_hf.py", f"--ckpt={finished}", "--hf_dir=/proc/self/no_such_export", check=False))
    assert "/nonexistent" in one_line_error(
        run_script("sample.py", f"--out_dir={finished}", "--start=FILE:/nonexistent", check=False))
    (tmp_path / "exits.py").write_text("import sys\nsys.exit(0)\n")
    assert "called sys.exit(0)" in one_line_error(
        run_script("train.py", *args, str(tmp_path / "exits.py"), check=False)
    )
    (tmp_path / "task.jsonl").write_text('{"context": "a", "choices": ["b", "c"], "answer": 0}\n{"context": \n')
    error = one_line_error(
        run_script(
            "train.py", *args, f"--out_dir={tmp_path}/t", f"--eval_tasks={{'{tmp_path}/task.jsonl': 0}}", check=False
        )
    )
    assert f"{tmp_path}/task.jsonl:2: not valid JSON" in error


@pytest.mark.slow
def test_rotation_leaves_a_linked_checkpoint_alone(finished, data, tmp_path):
    elsewhere = tmp_path / "kept" / "ckpt_0000002"
    shutil.copytree(finished / "ckpt_0000004", elsewhere)
    meta = json.loads((elsewhere / "meta.json").read_text())
    (elsewhere / "meta.json").write_text(json.dumps({**meta, "step": 2}))
    run = tmp_path / "run"
    os.makedirs(run)
    shutil.copytree(finished / "ckpt_0000004", run / "ckpt_0000004")
    os.symlink(elsewhere, run / "ckpt_0000002")
    run_script("train.py", *TINY, f"--data_dir={data}", f"--out_dir={run}", "--init_from=resume", "--max_iters=8",
               "--eval_interval=2", "--keep_last_checkpoints=1")
    assert os.path.islink(run / "ckpt_0000002") and (elsewhere / "meta.json").exists()
    assert [os.path.basename(p) for p in checkpoint_paths(str(run))] == ["ckpt_0000002", "ckpt_0000008"]


def test_rank_zero_notices_a_dead_rank_during_a_checkpoint_write(tmp_path, monkeypatch):
    # rank 1 never writes its part (it died): rank 0 gives up soon after its own, not after 600 s
    monkeypatch.setattr(checkpoint, "PART_STALL_S", 1.0)
    import torch

    from conftest import checkpoint_meta
    from model import GPT, ModelArgs
    from infra.resume import state_pieces
    model = GPT(ModelArgs(vocab_size=300, block_size=16, n_layer=1, n_head=2, n_kv_head=2, n_embd=16))
    started = time.time()
    with pytest.raises(OSError, match="rank 1's part did not appear .* did rank 1 die"):
        checkpoint.save_checkpoint(str(tmp_path), 1, state_pieces(model, {}, 0, 2), checkpoint_meta(model, 1),
                                   rank=0, world_size=2)
    assert time.time() - started < 30 and not checkpoint_paths(str(tmp_path)) and torch.is_tensor(model.lm_head.weight)


@pytest.mark.slow
def test_ctrl_c_stops_the_pipeline_and_the_next_stage_never_starts(tmp_path):
    env = {**os.environ, "OUT_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    command = ["bash", "run_pipeline.sh", "configs/tiny.py", "tests/slow_pipeline.py"]
    # its own process group, as a terminal's foreground job, with Ctrl-C at its default: a shell that starts
    # with SIGINT ignored (pytest launched in the background by a script) can never trap it
    pipeline = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics = tmp_path / "pretrain-tiny-slow_pipeline" / "metrics.jsonl"
    deadline = time.time() + 600
    while (
        time.time() < deadline
        and pipeline.poll() is None
        and not (metrics.exists() and '"loss"' in metrics.read_text())
    ):
        time.sleep(0.2)
    assert pipeline.poll() is None, pipeline.communicate()[1][-3000:]  # still training, not ended on an error
    os.killpg(pipeline.pid, signal.SIGINT)  # Ctrl-C: the whole foreground group
    stdout, stderr = pipeline.communicate(timeout=300)
    assert pipeline.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert "interrupted in the pretrain stage" in stderr and "run the same command again" in stderr
    assert "=== midtrain" not in stdout and not (tmp_path / "midtrain-tiny-slow_pipeline").exists()
    assert checkpoint_paths(str(tmp_path / "pretrain-tiny-slow_pipeline"))  # the stopped stage resumes from here


def test_a_shard_edited_after_prepare_is_refused_when_read(data, tmp_path):
    from data import read_shard, write_shard
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    meta = json.loads((bad / "meta.json").read_text())
    shard = meta["splits"]["train"]["shards"][0]
    tokens = np.array(read_shard(str(bad / shard)))
    tokens[np.arange(0, len(tokens), 50)] = meta["vocab_size"] + 1  # meta.json's recorded maxima left as they were
    write_shard(str(bad / shard), tokens)
    error = one_line_error(
        run_script("train.py", *TINY, f"--data_dir={bad}", f"--out_dir={tmp_path}/out", "--max_iters=4", check=False)
    )
    assert f"{bad / shard} holds token id {meta['vocab_size'] + 1} at offset" in error
    assert not checkpoint_paths(str(tmp_path / "out"))



def test_a_checkpoint_of_another_model_copied_into_a_run_is_refused_not_resumed(finished, data, tmp_path):
    """A newer checkpoint of another shape beside the run's own (copied in from elsewhere) would be resumed
    and the run's own rotated away: refused in one line, nothing changed."""
    import torch
    from infra.checkpoint import save_checkpoint
    from infra.resume import state_pieces
    from conftest import checkpoint_meta
    from model import GPT, ModelArgs
    run = copy_of(finished, tmp_path)
    torch.manual_seed(0)
    other = GPT(ModelArgs(vocab_size=300, block_size=16, n_layer=1, n_head=2, n_kv_head=2, n_embd=16))
    meta = checkpoint_meta(other, 12)
    meta["config"] = json.loads((run / "ckpt_0000008" / "meta.json").read_text())["config"]
    save_checkpoint(str(run), 12, state_pieces(other, {}, 0, 1), meta, keep_last=0)
    before = snapshot(run)
    error = one_line_error(run_script("train.py", *TINY, f"--data_dir={data}", f"--out_dir={run}",
                                      "--init_from=resume", "--max_iters=16", check=False))
    assert "ckpt_0000012 is a model of another shape than ckpt_0000004 beside it:" in error
    assert "n_embd=16 against 64" in error
    assert "move it out of" in error and snapshot(run) == before


def test_a_checkpoint_rotated_away_while_it_is_opened_is_not_called_corrupt(finished, tmp_path, monkeypatch, capsys):
    """A handoff from a run that is still writing: the newest checkpoint can rotate away between the listing
    and the read. The next newest is opened, and nothing is called corrupt or set aside."""
    run = copy_of(finished, tmp_path)
    opened = checkpoint._open_directory

    def rotated_first(path, verify=False):
        if path.endswith("ckpt_0000008") and os.path.exists(path):
            shutil.rmtree(path)  # what the writing run's rotation does
        return opened(path, verify)
    monkeypatch.setattr(checkpoint, "_open_directory", rotated_first)
    meta, _ = checkpoint.open_checkpoint(str(run), set_aside_corrupt=True)
    out = capsys.readouterr().out
    assert meta["step"] == 4 and "was removed while it was read" in out
    assert "corrupt" not in out and not list(run.glob("*.corrupt*"))
