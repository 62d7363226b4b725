"""
Checkpoints: the one way to write and read them (train.py, sample.py, export_hf.py), and the one
way to read a Hugging Face model directory as one (init_from='hf:<dir>').

A checkpoint is out_dir/ckpt_<step>.pt, a torch.save of plain containers, tensors, numbers and
strings only, so it loads with torch.load(weights_only=True) and nothing in it is ever executed:
    format_version, step, tokens_seen, batch_size (at that step), model (state dict),
    optimizers (list of state dicts: AdamW, then Muon if used; full state, so a checkpoint does
    not depend on the world size), model_args, config (dicts of simple values), tokenizer
    (tokenizer.tokenizer_state: the whole tokenizer as text, so a checkpoint decodes on its own),
    data_dir, parent (the checkpoint this run's weights started from, or None)
The data position is the step: the windows of a step are a function of (seed, step).
Writes are atomic: a temporary file, fsynced, then renamed, then the directory fsynced, so a
crash at any instant leaves the previous checkpoints intact and at most a *.tmp file that
nothing loads. Whole directories (datasets, exports) are swapped in the same way.
"""
import glob
import json
import os
import re
import shutil
import threading
import time

import torch

from model import GPT, ModelArgs
import tokenizer as tok

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
    copied to CPU memory, and the write happens in a thread while training goes on: its failure is
    then reported by checkpoint_failure() (train.py asks after every step) or wait_for_checkpoint()."""
    wait_for_checkpoint()
    if not background:
        return _write_checkpoint(out_dir, state, keep_last, keep_every)
    state = _cpu_copy(state)

    def write():
        try:
            _write_checkpoint(out_dir, state, keep_last, keep_every)
        except BaseException as e:
            _pending_write["error"] = e
    _pending_write["thread"] = threading.Thread(target=write, name="checkpoint-writer")
    _pending_write["thread"].start()


def checkpoint_failure():
    """The error of a background write that failed, once, without waiting for a running one."""
    error, _pending_write["error"] = _pending_write["error"], None
    return error


def wait_for_checkpoint():
    """Block until a background write has finished; raise its error, if it had one."""
    if _pending_write["thread"] is not None:
        _pending_write["thread"].join()
        _pending_write["thread"] = None
    error = checkpoint_failure()
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
    try:
        with open(tmp, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
    except Exception as e:  # torch reports a failed write (disk full, file too large) as a RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        free = shutil.disk_usage(out_dir).free / 2**20
        raise OSError(f"checkpoint at step {state['step']} not written: {type(e).__name__}: "
                                   f"{str(e).strip().splitlines()[0][:300]} (disk full? {free:,.0f} MiB free in {out_dir})") from e
    os.replace(tmp, path)
    directory = os.open(out_dir, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    if keep_last > 0:  # only loadable checkpoints are here: a file that failed to load was set aside
        for old in checkpoint_paths(out_dir)[:-keep_last]:
            if not (keep_every and int(CHECKPOINT_NAME.search(old).group(1)) % keep_every == 0):
                os.remove(old)
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:,.1f} MiB) in {time.time() - started:.2f}s", flush=True)
    return path


def remove_stale_writes(out_dir):
    """Temporary files of checkpoint writes that a crash interrupted: nothing loads them."""
    for stale in glob.glob(os.path.join(out_dir, "ckpt_*.pt.tmp")):
        os.remove(stale)


def load_checkpoint(path, device="cpu", set_aside=False):
    """Load a checkpoint file, the newest loadable checkpoint of a run directory, or a Hugging Face
    model directory (hf:<dir>, or a directory with a config.json and no checkpoints). A newest checkpoint that is truncated or corrupt is reported and
    the one before it used; with set_aside (a run resuming its own directory) it is also renamed
    to *.corrupt, so that it never counts as a checkpoint again (rotation keeps only loadable ones)."""
    if path.startswith("hf:"):
        return load_hf_checkpoint(path[3:])
    if os.path.isdir(path) and not checkpoint_paths(path) and os.path.exists(os.path.join(path, "config.json")):
        return load_hf_checkpoint(path)  # an exported (or any Llama/Qwen3) Hugging Face directory
    if os.path.isdir(path):
        candidates = checkpoint_paths(path)
        if not candidates:
            raise FileNotFoundError(f"no checkpoints (ckpt_*.pt) in {path}")
        for candidate in reversed(candidates):
            try:
                return load_checkpoint(candidate, device)
            except ValueError as e:
                print(f"warning: skipping {candidate}: {e}", flush=True)
                if set_aside:
                    os.replace(candidate, candidate + ".corrupt")
                    print(f"warning: set {candidate} aside as {os.path.basename(candidate)}.corrupt", flush=True)
        raise ValueError(f"no checkpoint in {path} could be loaded")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        if type(e).__name__ == "UnpicklingError" and "Weights only load failed" in str(e):
            raise ValueError(f"{path} holds objects that would run code when loaded (not only tensors and plain "
                             f"data): refused, nothing in it was executed") from None
        raise ValueError(f"{path} is truncated or corrupt ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a checkpoint of format version {FORMAT_VERSION}")
    checkpoint["path"] = path
    return checkpoint


def model_from_checkpoint(checkpoint, device="cpu"):
    """(model with the checkpoint's weights, its tokenizer)."""
    model = GPT(ModelArgs(**checkpoint["model_args"]))
    model.load_state_dict(checkpoint["model"])
    return model.to(device), tok.tokenizer_from_state(checkpoint["tokenizer"])


def load_hf_checkpoint(directory):
    """A Llama- or Qwen3-layout safetensors model and its byte-level BPE tokenizer, as a checkpoint
    dict (model, model_args, tokenizer, step, path) that train.py can start a stage from."""
    from safetensors.torch import load_file
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no Hugging Face model at {directory} (no config.json)")
    with open(config_path) as f:
        config = json.load(f)
    model_type = config.get("model_type")
    if model_type not in ("llama", "qwen3"):
        raise ValueError(f"{directory}: model_type {model_type!r} is not supported (llama or qwen3 only)")
    unsupported = [key for key, ok in [
        ("rope_scaling", not config.get("rope_scaling") and (config.get("rope_parameters") or {}).get("rope_type", "default") == "default"),
        ("attention_bias", not config.get("attention_bias", False)),
        ("mlp_bias", not config.get("mlp_bias", False)),
        ("hidden_act", config.get("hidden_act", "silu") == "silu"),
        ("sliding_window", not config.get("use_sliding_window", False)),
        ("head_dim", config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
         == config["hidden_size"] // config["num_attention_heads"]),
        ("vocab_size", config["vocab_size"] % 128 == 0),
    ] if not ok]
    if unsupported:
        raise ValueError(f"{directory}: unsupported settings {unsupported}")
    rope_base = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    n_embd = config["hidden_size"]
    mlp_hidden = config["intermediate_size"]
    if mlp_hidden % 128:
        raise ValueError(f"{directory}: intermediate_size {mlp_hidden} is not a multiple of 128")
    tensors = {}
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"{directory}: no .safetensors files")
    for file in files:
        tensors.update(load_file(os.path.join(directory, file)))
    state = {(name[len("model."):] if name.startswith("model.") else name): t.float() for name, t in tensors.items()}
    tie = config.get("tie_word_embeddings", False)
    if tie:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    enc = tok.tokenizer_from_hf(directory)
    if enc.n_vocab > config["vocab_size"]:
        raise ValueError(f"{directory}: the tokenizer has {enc.n_vocab} tokens, the model {config['vocab_size']}")
    model_args = {"vocab_size": enc.n_vocab, "block_size": config.get("max_position_embeddings", 2048),
                  "n_layer": config["num_hidden_layers"], "n_head": config["num_attention_heads"],
                  "n_kv_head": config.get("num_key_value_heads", config["num_attention_heads"]), "n_embd": n_embd,
                  "mlp_ratio": mlp_hidden / n_embd, "rope_base": float(rope_base), "qk_norm": model_type == "qwen3",
                  "tie_embeddings": tie, "norm_eps": config.get("rms_norm_eps", 1e-5)}
    if ModelArgs(**model_args).padded_vocab_size != config["vocab_size"]:
        raise ValueError(f"{directory}: vocab_size {config['vocab_size']} is not the tokenizer's {enc.n_vocab} "
                         f"padded to a multiple of 128")
    return {"model": state, "model_args": model_args, "tokenizer": tok.tokenizer_state(enc), "step": 0,
            "tokens_seen": 0, "parent": None, "path": "hf:" + directory}


def replace_directory(tmp, final):
    """Swap a finished directory (a dataset, an export) in for final; an older one there is removed
    only after that."""
    old = final.rstrip("/") + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


_lock_file = None  # held open (and locked) for the whole run


def lock_run_directory(out_dir):
    """Take out_dir for this process: an exclusive lock on out_dir/.lock, released when the process
    ends however it ends (the kernel drops it), so a lock left by a killed run is simply taken over.
    Raises RuntimeError naming the PID of a run that holds it."""
    global _lock_file
    import fcntl
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, ".lock")
    lock_file = open(path, "a+")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        holder = lock_file.read().strip() or "unknown"
        lock_file.close()
        raise RuntimeError(f"{out_dir} is in use by another run (PID {holder}): wait for it to end, or choose "
                           f"another --out_dir") from None
    lock_file.seek(0)
    previous = lock_file.read().strip()
    if previous:
        print(f"{out_dir}: taking over the lock of an earlier run (PID {previous}) that ended without releasing it",
              flush=True)
    lock_file.truncate(0)
    lock_file.write(f"{os.getpid()}\n")
    lock_file.flush()
    _lock_file = lock_file


def release_run_directory():
    """At a normal end: the lock file emptied (no PID left behind), then released."""
    global _lock_file
    if _lock_file is not None:
        _lock_file.truncate(0)
        _lock_file.close()
        _lock_file = None


def append_line(path, line):
    """Append line (and a newline) to a file whole, or not at all: a write cut short (disk full)
    is undone before the error is raised, so a reader never meets a torn last line."""
    data = (line + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
        except OSError:
            written = -1
        if written != len(data):
            os.ftruncate(fd, size)
            raise OSError(f"cannot append to {path} ({'disk full or file too large' if written >= 0 else 'write failed'}: "
                          f"{shutil.disk_usage(os.path.dirname(path) or '.').free / 2**20:,.0f} MiB free)")
    finally:
        os.close(fd)
