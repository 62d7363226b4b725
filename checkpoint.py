"""
Checkpoints: the one way to write and read them, used by train.py, sample.py and export_hf.py.

A checkpoint is out_dir/ckpt_<step>.pt, a torch.save of plain containers, tensors, numbers and
strings only, so it loads with torch.load(weights_only=True) and nothing in it is ever executed:
    format_version, step, tokens_seen, model (state dict), optimizer (state dict),
    model_args (dict), config (dict), tokenizer (tokenizer.tokenizer_state: the whole tokenizer
    as text, so a checkpoint decodes on its own), data_dir
Writes are atomic: a temporary file, fsynced, then renamed, so a crash leaves the previous
checkpoints intact and at most a *.tmp file that nothing loads.
"""
import glob
import os
import re

import torch

from model import GPT, ModelArgs
from tokenizer import tokenizer_from_state

FORMAT_VERSION = 1
CHECKPOINT_NAME = re.compile(r"ckpt_(\d+)\.pt$")


def checkpoint_paths(out_dir):
    """The checkpoints in out_dir, oldest first."""
    paths = [p for p in glob.glob(os.path.join(out_dir, "ckpt_*.pt")) if CHECKPOINT_NAME.search(p)]
    return sorted(paths, key=lambda p: int(CHECKPOINT_NAME.search(p).group(1)))


def save_checkpoint(out_dir, state, keep_last=3):
    """Write state as out_dir/ckpt_<step>.pt atomically, then delete all but the newest keep_last."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"ckpt_{state['step']:07d}.pt")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save({"format_version": FORMAT_VERSION, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(out_dir, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    if keep_last > 0:
        for old in checkpoint_paths(out_dir)[:-keep_last]:
            os.remove(old)
    return path


def load_checkpoint(path, device="cpu"):
    """Load a checkpoint file, or the newest loadable checkpoint of a run directory.
    A newest checkpoint that is truncated or corrupt is reported and the one before it used."""
    if os.path.isdir(path):
        candidates = checkpoint_paths(path)
        if not candidates:
            raise FileNotFoundError(f"no checkpoints (ckpt_*.pt) in {path}")
        for candidate in reversed(candidates):
            try:
                return load_checkpoint(candidate, device)
            except ValueError as e:
                print(f"warning: skipping {candidate}: {e}")
        raise ValueError(f"no checkpoint in {path} could be loaded")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated file, or it asks to unpickle something that is not plain data
        raise ValueError(f"cannot load {path} safely ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a checkpoint of format version {FORMAT_VERSION}")
    checkpoint["path"] = path
    return checkpoint


def model_from_checkpoint(checkpoint, device="cpu"):
    """(model with the checkpoint's weights, its tokenizer)."""
    model = GPT(ModelArgs(**checkpoint["model_args"]))
    model.load_state_dict(checkpoint["model"])
    return model.to(device), tokenizer_from_state(checkpoint["tokenizer"])
