"""Nothing lost, ever: corrupt checkpoints, divergence, two runs on one directory, failed writes,
bad data and bad settings. Each is a one-line error or a reported skip, and no good checkpoint or
dataset is ever lost or left half-written."""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from infra.checkpoint import checkpoint_paths, load_checkpoint
from conftest import ROOT, TINY_RUN as TINY, metric_records, one_line_error, snapshot
from conftest import run_script as run





@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_is_set_aside_and_never_outranks_good_ones(data, tmp_path):
    args = [*TINY, f"--data_dir={data}", "--eval_interval=5"]
    run("train.py", *args, f"--out_dir={tmp_path}", "--max_iters=20")  # checkpoints 10, 15, 20
    newest = tmp_path / "ckpt_0000020" / "rank-00000.safetensors"
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) - 1000)
    # resumed at 15 with room for one checkpoint only, ending (step 17) before the corrupt one's step
    result = run("train.py", *args, f"--out_dir={tmp_path}", "--init_from=resume", "--max_iters=17",
                 "--keep_last_checkpoints=1")
    assert "resumed from" in result.stdout and "ckpt_0000015" in result.stdout
    assert "set " in result.stdout and "ckpt_0000020.corrupt" in result.stdout
    assert [os.path.basename(p) for p in checkpoint_paths(str(tmp_path))] == ["ckpt_0000017"]
    assert (tmp_path / "ckpt_0000020.corrupt").exists()
    assert load_checkpoint(str(tmp_path))["step"] == 17  # and the next resume finds it
    run("train.py", *args, f"--out_dir={tmp_path}", "--init_from=resume", "--max_iters=18")


@pytest.mark.slow
def test_diverged_weights_are_never_checkpointed(data, tmp_path):
    args = [*TINY, f"--data_dir={data}", "--eval_interval=5", f"--out_dir={tmp_path}"]
    run("train.py", *args, "--max_iters=5")  # a good checkpoint at step 5
    good = load_checkpoint(str(tmp_path))
    # an absurd learning rate: the weights blow up, the loss goes non-finite
    result = run("train.py", *args, "--init_from=resume", "--max_iters=40", "--learning_rate=1e10",
                 "--max_bad_steps=1000", check=False)
    assert result.returncode != 0
    assert (
        "checkpoint at step 10 refused" in result.stderr
        and f"newest good checkpoint is {good['path']}" in result.stderr
    )
    for path in checkpoint_paths(str(tmp_path)):  # the good one is still there, and nothing poisoned
        assert all(torch.isfinite(t).all() for t in load_checkpoint(path)["model"].values())
    assert [os.path.basename(p) for p in checkpoint_paths(str(tmp_path))] == ["ckpt_0000005"]
    # the divergence guard names it too
    result = run("train.py", *args, "--init_from=resume", "--max_iters=40", "--learning_rate=1e10",
                 "--max_bad_steps=2", "--eval_interval=100", check=False)
    assert result.returncode != 0 and "steps in a row" in result.stderr
    assert f"newest good checkpoint is {good['path']}" in result.stderr
    # and a learning rate that is not a finite positive number is refused before anything runs
    for value in ("1e400", "0", "-1e-3"):
        error = one_line_error(run("train.py", *args, f"--learning_rate={value}", check=False))
        assert "learning_rate must be a finite number > 0" in error


@pytest.mark.slow
def test_a_second_run_on_the_same_directory_is_refused(data, tmp_path):
    command = [sys.executable, "train.py", *TINY, f"--data_dir={data}", f"--out_dir={tmp_path}", "--max_iters=100000",
               "--eval_interval=100000"]
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (tmp_path / "metrics.jsonl").exists() or len(metric_records(tmp_path)) < 3:
            time.sleep(0.05)
        second = run(
            "train.py", *TINY, f"--data_dir={data}", f"--out_dir={tmp_path}", "--init_from=resume", check=False
        )
        error = one_line_error(second)
        assert f"is in use by another run (PID {first.pid})" in error
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # a lock left by a killed run is taken over
    third = run("train.py", *TINY, f"--data_dir={data}", f"--out_dir={tmp_path}", "--init_from=resume", "--max_iters=2",
                "--eval_interval=2")
    assert f"taking over the lock of an earlier run (PID {first.pid})" in third.stdout


def test_a_failed_checkpoint_write_stops_the_run_at_once(data, tmp_path):
    # checkpoints of this model are about 1.7 MiB: a 1 MiB file-size limit makes their writes fail
    result = run("tests/file_size_limit.py", *TINY, f"--data_dir={data}", f"--out_dir={tmp_path}", "--max_iters=40",
                 "--eval_interval=4", env={"FILE_SIZE_LIMIT": str(2**20)}, check=False)
    assert result.returncode != 0
    assert "checkpoint at step 4 not written: " in result.stderr and "File too large" in result.stderr
    assert "(disk full?" in result.stderr and "Traceback" not in result.stderr
    steps = [r["step"] for r in metric_records(tmp_path) if "loss" in r]
    assert steps[-1] < 8  # stopped before the next checkpoint was due, not trained on without one
    assert not checkpoint_paths(str(tmp_path)) and not list(tmp_path.glob("*.tmp"))


def test_metrics_lines_are_written_whole_or_not_at_all(data, tmp_path):
    result = run("tests/file_size_limit.py", *TINY, f"--data_dir={data}", f"--out_dir={tmp_path}", "--max_iters=200",
                 "--eval_interval=1000", env={"FILE_SIZE_LIMIT": "6000"}, check=False)
    error = one_line_error(result)
    assert "cannot append to" in error and "metrics.jsonl" in error
    records = metric_records(tmp_path)
    assert len(records) > 3 and os.path.getsize(tmp_path / "metrics.jsonl") < 6000


def test_token_ids_outside_the_vocabulary_are_refused(data, tmp_path):
    meta = json.loads(open(os.path.join(data, "meta.json")).read())
    from data import read_shard, write_shard
    shards = meta["splits"]["train"]["shards"]
    assert meta["splits"]["train"]["max_token_ids"] == [int(read_shard(os.path.join(data, s)).max()) for s in shards]
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    tokens = np.array(read_shard(str(bad / shards[0])))
    tokens[100] = meta["vocab_size"] + 3  # inside the padded embedding: would train silently
    write_shard(str(bad / shards[0]), tokens)
    for recorded in (True, False):  # meta.json as prepare.py writes it, or without the recorded maxima
        meta["splits"]["train"]["max_token_ids"] = [int(tokens.max())] if recorded else None
        (bad / "meta.json").write_text(json.dumps(meta))
        error = one_line_error(run("train.py", *TINY, f"--data_dir={bad}", f"--out_dir={tmp_path}/out", check=False))
        assert (
            f"{bad / shards[0]} holds token id {meta['vocab_size'] + 3}, outside the vocabulary of {meta['vocab_size']}"
            in error
        )


@pytest.mark.slow
def test_bad_settings_and_files_are_one_line_errors(data, tmp_path):
    args = [*TINY, f"--data_dir={data}", f"--out_dir={tmp_path}/out"]
    for setting, message in [("--max_iters=-5", "max_iters must not be negative, got -5"),
                             ("--micro_batch_size=0", "micro_batch_size must be at least 1, got 0"),
                             ("--micro_batch_size=-1", "micro_batch_size must be at least 1, got -1"),
                             ("--eval_interval=0", "eval_interval must be at least 1"),
                             ("--log_interval=0", "log_interval must be at least 1"),
                             ("--device=cuda", "torch sees no CUDA device here"),
                             *([("--wandb_project=x", "but wandb is not installed: pip install wandb")]
                               if importlib.util.find_spec("wandb") is None else [])]:
        assert message in one_line_error(run("train.py", *args, setting, check=False))
    assert not (tmp_path / "out").exists()  # refused before anything is created
    corrupt = tmp_path / "corrupt"
    shutil.copytree(data, corrupt)
    (corrupt / "meta.json").write_text('{"vocab_size": 512, "splits": ')
    error = one_line_error(run("train.py", *TINY, f"--data_dir={corrupt}", f"--out_dir={tmp_path}/out2", check=False))
    assert f"{corrupt / 'meta.json'} is corrupt" in error
    assert not checkpoint_paths(str(tmp_path / "out"))


def test_prepare_replaces_lone_surrogates_and_skips_files_that_are_not_text(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(40):
        (docs / f"{i}.txt").write_text(f"Document {i}: the quick brown fox jumps over the lazy dog.\n")
    (docs / "program.txt").write_bytes(open(sys.executable, "rb").read()[:50000])  # an ELF binary named .txt
    (docs / "nul.md").write_bytes(b"text\x00with a NUL byte\n")
    # valid JSON, not valid UTF-8: a lone surrogate, in a text record and in a conversation
    (docs / "records.jsonl").write_text('{"text": "bad \\ud800 here"}\n{"text": "fine"}\n')
    result = run("prepare.py", str(docs), f"--out={tmp_path}/ds", "--vocab_size=300", "--val_fraction=0.2")
    assert "program.txt: not UTF-8 text" in result.stderr and "nul.md: not text (NUL bytes)" in result.stderr
    assert "skipped 2 documents" in result.stderr and "with U+FFFD in 1 documents" in result.stderr
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert meta["skipped_documents"] == 2 and meta["documents_with_replaced_characters"] == 1
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 42
    (tmp_path / "chat.jsonl").write_text(
        (
            "".join(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"Question {i}"},
                            {"role": "assistant", "content": f"Answer {i}"},
                        ]
                    }
                )
                + "\n"
                for i in range(30)
            )
        ).replace("Answer 7", "Answer \\udfff 7")
    )
    result = run("prepare.py", str(tmp_path / "chat.jsonl"), "--chat=True", f"--tokenizer={tmp_path}/ds",
                 f"--out={tmp_path}/chat", "--val_fraction=0.2")
    assert "with U+FFFD in 1 documents" in result.stderr
    # binaries only: an error, and no dataset
    (tmp_path / "bins").mkdir()
    shutil.copy(docs / "program.txt", tmp_path / "bins" / "a.txt")
    result = run("prepare.py", str(tmp_path / "bins"), f"--out={tmp_path}/none", check=False)
    assert result.returncode != 0 and "the sources hold no text" in result.stderr and not (tmp_path / "none").exists()
    # a tokenizer directory whose tokenizer.json is damaged: one line naming it, and no dataset
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "tokenizer.json").write_text("{not json")
    result = run("prepare.py", str(docs), f"--tokenizer={tmp_path}/damaged", f"--out={tmp_path}/none",
                 "--val_fraction=0.2", check=False)
    assert f"{tmp_path / 'damaged' / 'tokenizer.json'} is corrupt" in one_line_error(result)
    assert not (tmp_path / "none").exists()


def test_an_empty_split_is_named(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"{i}.txt").write_text(f"Document {i}.\n")
    for fraction, empty in (("0.999999", "train"), ("0.000001", "val")):  # every document in one split
        error = one_line_error(run("prepare.py", str(docs), f"--out={tmp_path}/ds", "--tokenizer=bytes",
                                   f"--val_fraction={fraction}", check=False))
        assert f"no documents in the {empty} split (3 in all)" in error and not (tmp_path / "ds").exists()


def test_chat_data_in_either_format_prepares_with_the_default_tokenizer(tmp_path):
    # the same conversations in OpenAI's and ShareGPT's formats, each with one bad line; the default
    # tokenizer (a BPE trained on the data: the rendered messages' text) for both
    words = "the a json dumps loads string file path open read write list dict return value error".split()
    rng = np.random.default_rng(0)
    talks = [[("system", "Be brief."), ("user", " ".join(rng.choice(words, 8)) + "?"),
              ("assistant", " ".join(rng.choice(words, 20)))] for _ in range(200)]
    sharegpt_role = {"system": "system", "user": "human", "assistant": "gpt"}
    formats = {
        "openai": [{"messages": [{"role": r, "content": c} for r, c in talk]} for talk in talks]
        + [{"messages": [{"role": "bot", "content": "x"}]}],
        "sharegpt": [{"conversations": [{"from": sharegpt_role[r], "value": c} for r, c in talk]} for talk in talks]
        + [{"conversations": [{"from": "bot", "value": "x"}]}],
    }
    shards = {}
    for name, records in formats.items():  # each as <its directory>/chat.jsonl: the same names, the same split
        (tmp_path / name).mkdir()
        (tmp_path / name / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        result = run(os.path.join(ROOT, "prepare.py"), "chat.jsonl", "--chat=True", "--vocab_size=300",
                     "--out=data", "--val_fraction=0.1", cwd=tmp_path / name)
        assert "chat.jsonl:201" in result.stderr  # the bad line, named and skipped
        meta = json.loads((tmp_path / name / "data" / "meta.json").read_text())
        assert meta["chat"] and meta["vocab_size"] == 300
        shards[name] = [(tmp_path / name / "data" / f).read_bytes()
                        for f in sorted(os.listdir(tmp_path / name / "data")) if f.endswith(".bin")]
    assert shards["openai"] == shards["sharegpt"]  # the same tokens and loss masks
    (tmp_path / "neither.jsonl").write_text('{"prompt": "a", "response": "b"}\n' * 5)
    result = run("prepare.py", str(tmp_path / "neither.jsonl"), "--chat=True", f"--out={tmp_path}/neither",
                 check=False)
    line = one_line_error(result)
    assert "no line is a conversation" in line and '"messages"' in line and '"conversations"' in line, line
    assert not (tmp_path / "neither").exists()


@pytest.mark.slow
def test_a_finite_divergence_stops_the_run_and_keeps_every_good_checkpoint(data, tmp_path):
    # AdamW at a learning rate of 1: the loss stays finite but the model is ruined (val loss up by ~2 nats)
    args = [*TINY, f"--data_dir={data}", "--eval_interval=5", "--eval_iters=2", f"--out_dir={tmp_path}"]
    run("train.py", *args, "--max_iters=15")
    before = checkpoint_paths(str(tmp_path))
    result = run("train.py", *args, "--init_from=resume", "--max_iters=40", "--learning_rate=1.0", check=False)
    line = one_line_error(result)
    assert "checkpoint at step 20 refused: val loss" in line and "nat above the run's best" in line, line
    assert f"the newest good checkpoint is {before[-1]}" in line
    assert checkpoint_paths(str(tmp_path)) == before and len(before) == 3  # nothing rotated away


def test_settings_out_of_range_are_named_before_anything_starts(tmp_path):
    import ast
    from infra.settings import config_problem, sample_problem, schedule_batch_sizes
    printed = run("train.py", "--print_config").stdout
    defaults = {k: ast.literal_eval(v) for k, _, v in (line.partition(" = ") for line in printed.splitlines())}
    schedule = {"strategy": "doubling", "start_batch_size": 16, "interval_steps": 100, "max_batch_size": 64}
    for change, message in [({"beta2": 1.5}, "beta2 must be in [0, 1)"),
                            ({"wsd_decay_frac": -1}, "wsd_decay_frac must be in [0, 1]"),
                            ({"min_lr": 1e-2}, "min_lr=0.01 is above learning_rate=0.0006"),
                            ({"muon_momentum": 5}, "muon_momentum must be in [0, 1)"),
                            ({"weight_decay": -0.1}, "weight_decay must be a finite number >= 0"),
                            ({"batch_size_schedule": {**schedule, "start_batch_size": "16"}}, "whole numbers"),
                            ({"batch_size_schedule": {**schedule, "interval_steps": 0.5}}, "whole numbers"),
                            ({"batch_size_schedule": {**schedule, "max_batch_size": 8}}, "max_batch_size >= start")]:
        assert message in config_problem({**defaults, **change}, world_size=1), change
    assert config_problem(defaults, world_size=1) is None
    # the schedule's sizes without a step-by-step loop: the same as the loop, and instant for 10**12 steps
    brute = {min(64, 16 * 2 ** (step // 100)) for step in range(251)}
    assert schedule_batch_sizes(64, schedule, 250) == brute == {16, 32, 64}
    assert schedule_batch_sizes(64, schedule, 10**12) == {16, 32, 64}
    for setting, message in [("--top_k=-3", "top_k must not be negative"),
                             ("--temperature=-1", "temperature must be a finite number >= 0"),
                             ("--max_new_tokens=-5", "max_new_tokens must not be negative")]:
        assert message in one_line_error(run("sample.py", f"--out_dir={tmp_path}", setting, check=False))
    assert sample_problem({"temperature": 0, "top_k": 0, "max_new_tokens": 0, "num_samples": 1}) is None


def test_prepare_on_a_full_disk_is_one_line_and_leaves_the_old_dataset(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(40):
        (docs / f"{i}.txt").write_text(f"Document {i}: the quick brown fox jumps over the lazy dog.\n" * 20)
    run("prepare.py", str(docs), f"--out={tmp_path}/ds", "--vocab_size=300", "--val_fraction=0.2")
    def dataset():  # (its .lock holds the PID of the last writer)
        return {name: data for name, data in snapshot(tmp_path / "ds").items() if name != ".lock"}
    before = dataset()
    result = run("tests/file_size_limit.py", str(docs), f"--out={tmp_path}/ds", "--vocab_size=300",
                 "--val_fraction=0.2", env={"FILE_SIZE_LIMIT": "2000", "SCRIPT": "prepare.py"}, check=False)
    error = result.stderr.strip().splitlines()[-1]  # (after prepare.py's progress lines)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"cannot write {tmp_path}/ds: File too large" in error and "free some space or choose another --out" in error
    assert dataset() == before and sorted(os.listdir(tmp_path)) == ["docs", "ds"]


def test_an_optimizer_that_ignores_found_inf_is_refused_at_start(data, tmp_path):
    """The divergence guard skips a step by setting each optimizer's found_inf: an optimizer swapped in that
    ignores it would apply the NaN steps. Probed at start, refused in one line, nothing written."""
    from infra.parallel import found_inf_problem
    from model import GPT, ModelArgs
    from muon import Muon
    model = GPT(ModelArgs(vocab_size=128, block_size=16, n_layer=1, n_head=2, n_kv_head=2, n_embd=16))
    groups, _ = model.param_groups(learning_rate=1e-3, weight_decay=0.1, use_muon=True)
    before = [p.detach().clone() for p in model.parameters()]
    honours = {"adamw": torch.optim.AdamW(groups["adamw"], lr=1e-3, fused=True), "muon": Muon(groups["muon"])}
    assert found_inf_problem(honours, model.parameters()) is None
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    groups, _ = model.param_groups(learning_rate=1e-3, weight_decay=0.1, use_muon=True)  # (fused=True is in the old)
    unfused = {"adamw": torch.optim.AdamW(groups["adamw"], lr=1e-3), "muon": Muon(groups["muon"])}
    assert "the optimizer 'adamw' (AdamW) fails with found_inf set" in found_inf_problem(unfused, model.parameters())
    result = run("tests/swapped_optimizer.py", *TINY, f"--data_dir={data}", f"--out_dir={tmp_path}/run", check=False)
    error = one_line_error(result)
    assert "the optimizer 'adamw' (IgnoresFoundInf) ignores found_inf: a step with a non-finite loss" in error
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
