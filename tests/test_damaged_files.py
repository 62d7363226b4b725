"""Every on-disk format the project reads, damaged field by field (removed, wrong type, out of range,
truncated): its one reader raises an error that names the file and the field for each damage, and a
command meeting one prints it in one line, exits non-zero and leaves the run's checkpoints untouched
(checked once per format: each command catches the readers' errors the same way); resuming over a
damaged newest checkpoint falls back to the one before."""
import json
import os
import shutil

import numpy as np
import pytest

from conftest import TINY_RUN as TINY, one_line_error, run_script, snapshot

pytestmark = pytest.mark.slow  # every test here trains a run first


def edited(path, change):
    """Apply change to a JSON file's content (a dict or list), in place."""
    with open(path) as f:
        value = json.load(f)
    value = change(value)
    with open(path, "w") as f:
        json.dump(value, f)


def damaged_copies(original, damaged, filename, cases):
    """For each case (what, change, field): a fresh copy of original at damaged, its filename edited by
    change; yields (what, field)."""
    for what, change, field in cases:
        shutil.rmtree(damaged, ignore_errors=True)
        shutil.copytree(original, damaged)
        edited(damaged / filename, change)
        yield what, field


def without(key):
    return lambda d: {k: v for k, v in d.items() if k != key}


def setting(key, value):
    return lambda d: {**d, key: value}


def split_setting(key, value):
    return lambda d: {**d, "splits": {**d["splits"], "train": {**d["splits"]["train"], key: value}}}


DATASET_META = [("no vocab_size", without("vocab_size"), "vocab_size"),
                ("vocab_size a string", setting("vocab_size", "512"), "vocab_size"),
                ("vocab_size huge", setting("vocab_size", 10**12), "vocab_size"),
                ("no bos_id", without("bos_id"), "bos_id"),
                ("bos_id past the vocabulary", setting("bos_id", 10**6), "bos_id"),
                ("no splits", without("splits"), "splits"),
                ("shards not a list", split_setting("shards", "train_000000.bin"), "shards"),
                ("a shard path outside", split_setting("shards", ["../x.bin"]), "shards"),
                ("a shard named ..", split_setting("shards", [".."]), "outside the dataset's directory"),
                ("the val split is the train split",
                 lambda d: {**d, "splits": {**d["splits"], "val": d["splits"]["train"]}}, "share a file"),
                ("max_token_ids of another length", split_setting("max_token_ids", [1, 2, 3]), "max_token_ids"),
                ("format_version", setting("format_version", 99), "format_version"),
                ("a JSON list", lambda d: [d], "not a JSON object")]


def test_dataset_meta_damaged_field_by_field(finished, data, tmp_path):
    from data import open_dataset
    damaged = tmp_path / "data"
    # each damage: a ValueError naming the file and the field
    for what, field in damaged_copies(data, damaged, "meta.json", DATASET_META):
        with pytest.raises(ValueError) as error:
            open_dataset(str(damaged), 64)
        assert f"{damaged / 'meta.json'} is corrupt" in str(error.value) and field in str(error.value), what
    (damaged / "meta.json").write_text('{"vocab_size": 5')  # truncated
    # and as train.py reports it, resuming a run over the damaged data: one line, the run untouched
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = snapshot(run)
    error = one_line_error(run_script("train.py", *TINY, f"--data_dir={damaged}", f"--out_dir={run}",
                                      "--init_from=resume", "--max_iters=12", check=False))
    assert f"{damaged / 'meta.json'} is corrupt" in error
    assert snapshot(run) == before


def test_dataset_shards_and_masks_damaged(data, tmp_path):
    from data import read_shard, write_shard
    chat = tmp_path / "chat"
    shutil.copytree(data + "-chat", chat)
    meta = json.loads((chat / "meta.json").read_text())
    mask_name = meta["splits"]["train"]["masks"][0]
    mask = np.array(read_shard(str(chat / mask_name)))
    write_shard(str(chat / mask_name), mask[:-100])  # a complete shard, 100 entries short of its tokens
    error = one_line_error(run_script("train.py", *TINY, f"--data_dir={chat}", f"--out_dir={tmp_path}/out",
                                      "--use_loss_mask=True", check=False))
    assert f"{chat / meta['splits']['train']['shards'][0]} holds" in error and "its mask" in error
    text = tmp_path / "text"
    shutil.copytree(data, text)
    shard = text / json.loads((text / "meta.json").read_text())["splits"]["val"]["shards"][0]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 7)
    error = one_line_error(
        run_script("train.py", *TINY, f"--data_dir={text}", f"--out_dir={tmp_path}/out", check=False)
    )
    assert f"{shard}: truncated or corrupt" in error


def model_args(key, value):
    return lambda d: {**d, "model_args": {**d["model_args"], key: value}}


def tensor_shape(d):
    name = next(n for n in d["tensors"] if n.startswith("model/layers.0."))
    return {**d, "tensors": {**d["tensors"], name: {**d["tensors"][name], "shape": [3, 3]}}}


def tensor_entry(name, **change):
    return lambda d: {**d, "tensors": {**d["tensors"], name: {**d["tensors"][name], **change}}}


CHECKPOINT_META = [
    ("no model_args", without("model_args"), "model_args"),
    ("n_layer a string", model_args("n_layer", "2"), "n_layer"),
    ("no n_head", lambda d: {**d, "model_args": without("n_head")(d["model_args"])}, "n_head"),
    ("vocab_size huge", model_args("vocab_size", 10**12), "vocab_size"),
    ("n_head zero", model_args("n_head", 0), "n_head"),
    ("one layer more than the tensors", model_args("n_layer", 3), "missing"),
    ("a tensor left out", lambda d: {**d, "tensors": without("model/norm.weight")(d["tensors"])}, "norm.weight"),
    ("a tensor's shape", tensor_shape, "shape"),
    ("tokenizer a string", setting("tokenizer", "gpt2"), "tokenizer"),
    ("step negative", setting("step", -1), "step"),
    ("no config", without("config"), "config"),
    ("a weight stored as int32", tensor_entry("model/norm.weight", dtype="int32"), "is not float32"),
    ("optimizer state of another shape", tensor_entry("adamw/norm.weight/exp_avg", shape=[3]), "not its parameter's"),
    ("optimizer state left out", lambda d: {**d, "tensors": without("adamw/norm.weight/exp_avg")(d["tensors"])},
     "optimizer state of norm.weight is missing"),
    ("state of no parameter", lambda d: {**d, "tensors": {**d["tensors"], "adamw/nothing/step":
                                                          d["tensors"]["adamw/norm.weight/step"]}}, "no parameter"),
    ("a step that is not the directory's", setting("step", 9), "named for step 0000008"),
    ("format_version", setting("format_version", 1), "format version"),
]


def test_checkpoint_meta_damaged_field_by_field(finished, tmp_path):
    from infra.checkpoint import load_checkpoint
    damaged = tmp_path / "ckpt_0000008"
    for what, field in damaged_copies(finished / "ckpt_0000008", damaged, "meta.json", CHECKPOINT_META):
        with pytest.raises(ValueError) as error:
            load_checkpoint(str(damaged))
        assert f"{damaged} is corrupt" in str(error.value) and field in str(error.value), (what, error.value)
    # as the tools report it: one line, nothing written
    error = one_line_error(run_script("export_hf.py", f"--ckpt={damaged}", f"--hf_dir={tmp_path}/hf", check=False))
    assert f"{damaged} is corrupt" in error and "format version" in error
    assert not (tmp_path / "hf").exists()


def test_resume_falls_back_over_an_invalid_newest_checkpoint(finished, data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    edited(run / "ckpt_0000008" / "meta.json", model_args("n_layer", 3))  # parses, but does not describe its tensors
    result = run_script("train.py", *TINY, f"--data_dir={data}", f"--out_dir={run}", "--init_from=resume",
                        "--max_iters=8", "--eval_interval=4")
    assert "skipping" in result.stdout and "resumed from" in result.stdout
    assert "ckpt_0000004" in result.stdout.split("resumed from")[1].splitlines()[0]
    assert (run / "ckpt_0000008.corrupt").is_dir() and (run / "ckpt_0000008").is_dir()
    # one byte of the optimizer state changed on disk (the header intact): its sha256 differs from the one
    # recorded at write time, so it is set aside too, and the checkpoint before it resumed from
    shutil.rmtree(run)
    shutil.copytree(finished, run)
    path = run / "ckpt_0000008" / "rank-00000.safetensors"
    data_bytes = bytearray(path.read_bytes())
    data_bytes[-3] ^= 0x01
    path.write_bytes(data_bytes)
    result = run_script("train.py", *TINY, f"--data_dir={data}", f"--out_dir={run}", "--init_from=resume",
                        "--max_iters=8", "--eval_interval=4")
    assert "rank-00000.safetensors: its content is not what was written (sha256" in result.stdout
    assert "ckpt_0000004" in result.stdout.split("resumed from")[1].splitlines()[0]
    assert (run / "ckpt_0000008.corrupt").is_dir()


def test_non_finite_optimizer_state_is_refused_with_its_checksum_intact(finished, tmp_path):
    """NaN in the state that training itself wrote (so its checksum matches): refused by name on the verified
    read a resume makes."""
    from safetensors.torch import load_file
    from conftest import rewrite_checkpoint_file
    from infra.checkpoint import open_checkpoint
    damaged = tmp_path / "ckpt_0000008"
    shutil.copytree(finished / "ckpt_0000008", damaged)
    path = damaged / "rank-00000.safetensors"
    tensors = load_file(path)
    name = next(n for n in tensors if n.startswith("adamw/") and "exp_avg_sq" in n)
    tensors[name][0] = float("nan")
    rewrite_checkpoint_file(path, tensors)
    with pytest.raises(ValueError, match=f"{name} holds values that are not finite"):
        open_checkpoint(str(damaged), verify=True)
    meta, read = open_checkpoint(str(damaged))  # unverified, the weights still read (the NaN is in the state)
    assert read("model/lm_head.weight").isfinite().all()


HF_CONFIG = [("no hidden_size", without("hidden_size"), "hidden_size"),
             ("hidden_size a string", setting("hidden_size", "64"), "hidden_size"),
             ("a JSON list", lambda d: [d], "a JSON object"),
             ("one layer more than the weights", setting("num_hidden_layers", 3), "num_hidden_layers"),
             ("one layer fewer than the weights", setting("num_hidden_layers", 1), "num_hidden_layers"),
             ("vocab_size zero", setting("vocab_size", 0), "vocab_size")]


def test_hf_config_damaged_field_by_field(finished, data, tmp_path):
    from infra.checkpoint import open_checkpoint
    damaged = tmp_path / "hf"
    for what, field in damaged_copies(finished / "hf", damaged, "config.json", HF_CONFIG):
        with pytest.raises(ValueError) as error:
            open_checkpoint(f"hf:{damaged}")
        assert str(damaged) in str(error.value) and field in str(error.value), (what, error.value)
    # as train.py reports it, a run starting from it: one line, no run directory filled
    error = one_line_error(run_script("train.py", *TINY, f"--data_dir={data}", f"--out_dir={tmp_path}/out",
                                      f"--init_from=hf:{damaged}", check=False))
    assert str(damaged) in error and "vocab_size" in error
    assert not [p for p in os.listdir(tmp_path / "out") if p.startswith("ckpt_")]


TASKS = [("not JSON", '{"context": "x", ', "not valid JSON"),
         ("not an object", '["x"]', "must be a JSON object"),
         ("no answer", '{"context": "x", "choices": ["a", "b"]}', "needs context, choices, answer"),
         ("answer out of range", '{"context": "x", "choices": ["a", "b"], "answer": 5}', "the index of one"),
         ("choices not strings", '{"context": "x", "choices": [1, 2], "answer": 0}', "must be strings")]


def test_task_files_damaged_line_by_line(finished, tmp_path):
    from evaluate import load_task
    good = '{"context": "x", "choices": ["a", "b"], "answer": 0}'
    for what, line, message in TASKS:
        (tmp_path / "task.jsonl").write_text(good + "\n" + line + "\n")
        with pytest.raises(ValueError) as error:
            load_task(str(tmp_path / "task.jsonl"))
        assert f"{tmp_path}/task.jsonl:2: " in str(error.value) and message in str(error.value), (what, error.value)
    error = one_line_error(
        run_script("evaluate.py", f"--ckpt={finished}", f"--tasks={tmp_path}/task.jsonl", check=False)
    )
    assert f"{tmp_path}/task.jsonl:2: " in error and "must be strings" in error


def test_a_dataset_that_disagrees_with_itself_and_bad_inputs_to_prepare(data, tmp_path):
    from data import open_mixture
    # meta.json's vocab_size is not its tokenizer's: refused, not a 16x embedding trained in silence
    shutil.copytree(data, tmp_path / "data")
    edited(tmp_path / "data" / "meta.json", setting("vocab_size", 8192))
    with pytest.raises(ValueError, match="says vocab_size 8192, but its tokenizer has 512 tokens"):
        open_mixture({str(tmp_path / "data"): 1.0}, 64)
    # a val shard whose bytes were edited after prepare.py (token ids past the vocabulary): one line at
    # the step-0 evaluation, no traceback
    shutil.rmtree(tmp_path / "data")
    shutil.copytree(data, tmp_path / "data")
    shard = tmp_path / "data" / "val_000000.bin"
    raw = bytearray(shard.read_bytes())
    raw[32:] = np.full((len(raw) - 32) // 2, 65000, dtype="<u2").tobytes()
    shard.write_bytes(bytes(raw))
    error = one_line_error(run_script("train.py", *TINY, f"--data_dir={tmp_path}/data", f"--out_dir={tmp_path}/run",
                                      "--max_iters=2", check=False))
    assert "holds token id 65000" in error, error
    # prepare.py: a BPE too small to hold the bytes, and a Hugging Face tokenizer.json cut short, named
    error = one_line_error(run_script("prepare.py", f"--out={tmp_path}/small", "--vocab_size=100", check=False))
    assert "--vocab_size=100 is too small for a BPE" in error and not (tmp_path / "small").exists()
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": {"a"')
    error = one_line_error(run_script("prepare.py", f"--out={tmp_path}/x", f"--tokenizer=hf:{tmp_path}/hf",
                                      check=False))
    assert f"{tmp_path}/hf/tokenizer.json is corrupt" in error, error
