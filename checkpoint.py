"""
Checkpoints: the one way to write and read them, used by train.py, sample.py and export_hf.py.

A checkpoint is out_dir/ckpt_<step>.pt, a torch.save of plain containers, tensors, numbers and
strings only, so it loads with torch.load(weights_only=True) and nothing in it is ever executed:
    format_version, step, tokens_seen, batch_size (at that step), model (state dict),
    optimizers (list of state dicts: AdamW, then Muon if used; full state, the same on every
    rank, so a checkpoint does not depend on the world size), rng (per-rank torch CPU/CUDA
    states, numpy and python states, as tensors), model_args, config (dicts of simple values),
    tokenizer (tokenizer.tokenizer_state: the whole tokenizer as text, so a checkpoint decodes on
    its own), data_dir, parent (the checkpoint this run's weights started from, or None)
The data position is the step: the windows of a step are a function of (seed, step).
Writes are atomic: a temporary file, fsynced, then renamed, then the directory fsynced, so a
crash at any instant leaves the previous checkpoints intact and at most a *.tmp file that
nothing loads.
"""
import glob
import os
import random
import re
import threading
import time

import numpy as np
import torch

from model import GPT, ModelArgs
from tokenizer import tokenizer_from_state

FORMAT_VERSION = 1
CHECKPOINT_NAME = re.compile(r"ckpt_(\d+)\.pt$")


def checkpoint_paths(out_dir):
    """The checkpoints in out_dir, oldest first."""
    paths = [p for p in glob.glob(os.path.join(out_dir, "ckpt_*.pt")) if CHECKPOINT_NAME.search(p)]
    return sorted(paths, key=lambda p: int(CHECKPOINT_NAME.search(p).group(1)))


_pending_write = {"thread": None, "error": None}


def save_checkpoint(out_dir, state, keep_last=3, keep_every=0, background=False):
    """Write state as out_dir/ckpt_<step>.pt atomically, then delete all but the newest keep_last
    (and those whose step is a multiple of keep_every). With background=True the state is first
    copied to CPU memory, and the write happens in a thread while training goes on."""
    wait_for_checkpoint()
    if not background:
        return _write_checkpoint(out_dir, state, keep_last, keep_every)
    state = _cpu_copy(state)

    def write():
        try:
            _write_checkpoint(out_dir, state, keep_last, keep_every)
        except BaseException as e:  # re-raised in the training thread by wait_for_checkpoint
            _pending_write["error"] = e
    _pending_write["thread"] = threading.Thread(target=write, name="checkpoint-writer")
    _pending_write["thread"].start()


def wait_for_checkpoint():
    """Block until a background write has finished; raise its error, if it had one."""
    if _pending_write["thread"] is not None:
        _pending_write["thread"].join()
        _pending_write["thread"] = None
    error, _pending_write["error"] = _pending_write["error"], None
    if error is not None:
        raise error


def _cpu_copy(value):
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _cpu_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(v) for v in value)
    return value


def _write_checkpoint(out_dir, state, keep_last, keep_every):
    started = time.time()
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
            if not (keep_every and int(CHECKPOINT_NAME.search(old).group(1)) % keep_every == 0):
                os.remove(old)
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:,.1f} MiB) in {time.time() - started:.2f}s", flush=True)
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


def rng_state():
    """This process's random number generators, as tensors and numbers (no pickled objects)."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    return {
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss_next": gauss_next},
    }


def set_rng_state(state):
    torch.set_rng_state(state["torch_cpu"].cpu())
    if state["torch_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"].cpu())
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss_next"]))
