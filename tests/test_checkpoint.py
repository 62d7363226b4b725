import json
import os

import pytest
import torch

from infra.checkpoint import checkpoint_paths, load_checkpoint, model_from_checkpoint, save_checkpoint
from infra.resume import state_pieces
from conftest import checkpoint_meta
from model import GPT, ModelArgs

import tokenizer as tok


def write(directory, step, keep_last=3, keep_every=0):
    """A checkpoint of a small model, its AdamW state after one step, as train.py writes it (one rank)."""
    torch.manual_seed(step)
    model = GPT(ModelArgs(vocab_size=300, block_size=16, n_layer=1, n_head=2, n_kv_head=2, n_embd=16))
    groups, _ = model.param_groups(learning_rate=1e-3, weight_decay=0.1)
    optimizers = {"adamw": torch.optim.AdamW(groups["adamw"], lr=1e-3, betas=(0.9, 0.95), fused=True)}
    model(torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))).backward()
    optimizers["adamw"].step()
    enc = tok.train_bpe(iter(["some text to train a tokenizer on"] * 10), 300)
    meta = {
        "step": step,
        "tokens_seen": step * 100,
        "model_args": vars(model.args),
        "config": {"lr": 1e-3, "schedule": None},
        "tokenizer": tok.tokenizer_state(enc),
        "data_dir": "data/x",
        "parent": None,
    }
    return save_checkpoint(str(directory), step, state_pieces(model, optimizers, 0, 1), meta, keep_last=keep_last,
                           keep_every=keep_every), model, optimizers


def test_round_trip_rotation_and_model(tmp_path):
    for step in (10, 20, 30, 40):
        _, model, optimizers = write(tmp_path, step, keep_last=2)
    assert [os.path.basename(p) for p in checkpoint_paths(str(tmp_path))] == ["ckpt_0000030", "ckpt_0000040"]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    checkpoint = load_checkpoint(str(tmp_path))
    assert checkpoint["step"] == 40 and checkpoint["config"] == {"lr": 1e-3, "schedule": None}
    loaded, enc = model_from_checkpoint(checkpoint)
    assert enc.decode(enc.encode_ordinary("some text")) == "some text"
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    for name, p in model.named_parameters():  # the optimizer state by parameter name, exactly
        for key, value in optimizers["adamw"].state[p].items():
            assert torch.equal(checkpoint["optimizers"]["adamw"][name][key], value)
    for step in (50, 60, 70, 80, 90):  # and keep_every keeps the multiples of its step, however old
        write(tmp_path, step, keep_last=1, keep_every=40)
    assert [os.path.basename(p) for p in checkpoint_paths(str(tmp_path))] == ["ckpt_0000040", "ckpt_0000080",
                                                                              "ckpt_0000090"]
    # only tensors and JSON: the files say what they hold
    files = sorted(os.listdir(tmp_path / "ckpt_0000040"))
    assert files == ["meta.json", "rank-00000.json", "rank-00000.safetensors"]
    assert json.loads((tmp_path / "ckpt_0000040" / "meta.json").read_text())["tensors"]["model/norm.weight"][
        "shape"
    ] == [16]


def test_a_verified_open_reads_each_file_once_and_checks_its_sha256(tmp_path):
    """Written: each file's sha256 in meta.json. Opened with verify (a resume's rank 0, load_checkpoint):
    every file read whole once, checked, and served from memory: the files can go and reads still work."""
    import hashlib
    from infra.checkpoint import open_checkpoint
    path, model, _ = write(tmp_path, 5)
    meta = json.loads(open(os.path.join(path, "meta.json")).read())
    with open(os.path.join(path, "rank-00000.safetensors"), "rb") as f:
        assert meta["files"] == {"rank-00000.safetensors": {"sha256": hashlib.sha256(f.read()).hexdigest()}}
    info, read = open_checkpoint(path, verify=True)
    os.remove(os.path.join(path, "rank-00000.safetensors"))
    for name, p in model.named_parameters():
        assert torch.equal(read(f"model/{name}"), p.detach())
    assert read("adamw/norm.weight/step").item() == 1 and "files" not in info
    # a file that was rewritten after its checkpoint was (the same tensors, other bytes): refused
    path, _, _ = write(tmp_path, 6)
    from safetensors.torch import load_file, save_file
    save_file(load_file(os.path.join(path, "rank-00000.safetensors")), os.path.join(path, "rank-00000.safetensors"))
    with pytest.raises(ValueError, match="sha256 differs from meta.json's"):
        open_checkpoint(path, verify=True)


def test_truncated_newest_falls_back_to_previous(tmp_path, capsys):
    write(tmp_path, 1)
    newest, _, _ = write(tmp_path, 2)
    shard = os.path.join(newest, "rank-00000.safetensors")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    assert load_checkpoint(str(tmp_path))["step"] == 1
    assert "skipping" in capsys.readouterr().out
    os.remove(os.path.join(tmp_path, "ckpt_0000001", "rank-00000.safetensors"))  # a part missing: refused too
    with pytest.raises(ValueError, match="no checkpoint .* could be loaded"):
        load_checkpoint(str(tmp_path))


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = "/tmp/checkpoint-test-was-executed"


def test_a_pickle_is_never_loaded(tmp_path):
    if os.path.exists(MARKER):
        os.remove(MARKER)
    path = tmp_path / "ckpt_0000001.pt"  # a torch.save file, as older tools wrote checkpoints
    torch.save({"format_version": 1, "step": 1, "evil": Payload()}, path)
    for target in (path, tmp_path):  # named directly, or the only "checkpoint" in a run directory
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            load_checkpoint(str(target))
    assert not os.path.exists(MARKER)


def test_rank_zero_never_reads_another_ranks_part_half_written(tmp_path, monkeypatch):
    # two ranks in one process; rank 1's files are written slowly, in two halves, as on a busy
    # shared file system: rank 0, polling for them, must only ever see rank 1's part marker complete
    import threading
    import time

    import infra.checkpoint as checkpoint
    real_write = checkpoint._write_and_sync

    def slow_write(path, data=None):
        if data is not None and "rank-00001" in path:
            with open(path, "wb") as f:
                f.write(data[:len(data) // 2])
                f.flush()
                time.sleep(0.3)
                f.write(data[len(data) // 2:])
            data = None
        real_write(path, data)
    monkeypatch.setattr(checkpoint, "_write_and_sync", slow_write)
    model = GPT(ModelArgs(vocab_size=300, block_size=16, n_layer=1, n_head=2, n_kv_head=2, n_embd=16))
    errors = []

    def rank(r):  # each rank writes its half of every tensor's rows
        try:
            save_checkpoint(
                str(tmp_path),
                1,
                state_pieces(model, {}, r, 2),
                checkpoint_meta(model, 1) if r == 0 else None,
                rank=r,
                world_size=2,
            )
        except Exception as e:
            errors.append(e)
    threads = [threading.Thread(target=rank, args=(r,)) for r in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    loaded = load_checkpoint(str(tmp_path))["model"]
    assert all(torch.equal(loaded[name], p) for name, p in model.named_parameters())


def test_rotation_keeps_the_newest_and_the_best_evaluated_checkpoints(tmp_path):
    from infra.checkpoint import checkpoint_paths, rotate
    for step, val_loss in [(5, 5.0), (10, 3.0), (15, None), (20, 4.0), (25, 4.5), (30, 4.8)]:
        (tmp_path / f"ckpt_{step:07d}").mkdir()
        (tmp_path / f"ckpt_{step:07d}" / "meta.json").write_text(json.dumps({"step": step, "val_loss": val_loss}))
    rotate(str(tmp_path), keep_last=2, keep_every=0)
    # a slow degradation after step 10: its checkpoint, the lowest val loss, outlives the rotation
    assert [os.path.basename(p) for p in checkpoint_paths(str(tmp_path))] == \
        ["ckpt_0000010", "ckpt_0000025", "ckpt_0000030"]
