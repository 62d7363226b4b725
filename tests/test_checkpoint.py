import os

import pytest
import torch

from checkpoint import checkpoint_paths, load_checkpoint, model_from_checkpoint, save_checkpoint
from model import GPT, ModelArgs
import tokenizer as tok


def state(step):
    model = GPT(ModelArgs(vocab_size=300, block_size=16, n_layer=1, n_head=2, n_kv_head=2, n_embd=16))
    enc = tok.train_bpe(iter(["some text to train a tokenizer on"] * 10), 300)
    return {"step": step, "tokens_seen": step * 100, "model": model.state_dict(), "optimizer": {},
            "model_args": vars(model.args), "config": {"lr": 1e-3, "schedule": None},
            "tokenizer": tok.tokenizer_state(enc), "data_dir": "data/x"}


def test_round_trip_rotation_and_model(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(str(tmp_path), state(step), keep_last=2)
    assert [os.path.basename(p) for p in checkpoint_paths(str(tmp_path))] == ["ckpt_0000030.pt", "ckpt_0000040.pt"]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    checkpoint = load_checkpoint(str(tmp_path))
    assert checkpoint["step"] == 40 and checkpoint["config"] == {"lr": 1e-3, "schedule": None}
    model, enc = model_from_checkpoint(checkpoint)
    assert enc.decode(enc.encode_ordinary("some text")) == "some text"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), checkpoint["model"].values()))


def test_truncated_newest_falls_back_to_previous(tmp_path, capsys):
    save_checkpoint(str(tmp_path), state(1))
    newest = save_checkpoint(str(tmp_path), state(2))
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    assert load_checkpoint(str(tmp_path))["step"] == 1
    assert "skipping" in capsys.readouterr().out


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = "/tmp/checkpoint-test-was-executed"


def test_a_checkpoint_that_needs_unpickling_is_refused_not_executed(tmp_path):
    if os.path.exists(MARKER):
        os.remove(MARKER)
    path = tmp_path / "ckpt_0000001.pt"
    torch.save({"format_version": 1, "step": 1, "evil": Payload()}, path)
    with pytest.raises(ValueError, match="holds objects that would run code when loaded .*: refused"):
        load_checkpoint(str(path))
    assert not os.path.exists(MARKER)
