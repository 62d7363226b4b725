"""
Checkpoints: the one way to write and read them (train.py, sample.py, export_hf.py, evaluate.py),
and of reading a Hugging Face model directory as one (init_from='hf:<dir>').

A checkpoint is a directory, out_dir/ckpt_<step>/, of safetensors and JSON files only, so reading
one never runs anything:
    meta.json              format_version 2, step, tokens_seen, batch_size, model_args, config,
                           tokenizer (the whole tokenizer as text: a checkpoint decodes on its own),
                           data_dir, parent (the checkpoint this run's weights started from), and
                           every tensor's shape, dtype and pieces (which file holds which rows)
    rank-NNNNN.safetensors the rows each rank wrote
The tensors: model/<parameter>, adamw/<parameter>/<exp_avg, exp_avg_sq or step>, and
muon/<parameter>/momentum_buffer: the whole training state as one process would hold it, whatever
the world size and the mode (DDP, FSDP2) that wrote it, so it loads at any world size and in either
mode, and a rank can read just the rows it needs. Each rank writes its own share at once (its
shards under FSDP2, a slice of the replicas under DDP): no rank ever holds the whole state.
Writes are atomic: each rank writes into ckpt_<step>.tmp/ (in a background thread, from a CPU copy
of its share), and rank 0 renames the directory once every rank's files are complete; a crash at
any instant leaves the earlier checkpoints and at most a *.tmp directory, which nothing loads and
the next start removes. Checkpoints of format 1 (one ckpt_<step>.pt file of plain containers,
loaded with weights_only=True) still load. The data position is the step: the windows of a step
are a function of (seed, step).
Also here, as they guard the checkpoints: the run directory's lock (one run per out_dir) and the
stop signals (a checkpoint, then exit 0).
"""
import glob
import json
import os
import re
import shutil
import signal
import sys
import threading
import time

import torch

from model import GPT, ModelArgs
import tokenizer as tok

FORMAT_VERSION = 2
CHECKPOINT_NAME = re.compile(r"ckpt_(\d+)(\.pt)?$")


def checkpoint_paths(out_dir):
    """The checkpoints in out_dir (directories ckpt_<step>, or format 1's files ckpt_<step>.pt), oldest first."""
    paths = [p for p in glob.glob(os.path.join(out_dir, "ckpt_*")) if CHECKPOINT_NAME.search(p)]
    return sorted(paths, key=lambda p: int(CHECKPOINT_NAME.search(p).group(1)))


def remove_stale_writes(out_dir):
    """Temporary directories (and format 1's files) of writes that a crash interrupted: nothing loads them."""
    for stale in glob.glob(os.path.join(out_dir, "ckpt_*.tmp")):
        shutil.rmtree(stale) if os.path.isdir(stale) else os.remove(stale)


# ---- writing ----------------------------------------------------------------------------------
_pending_write = {"thread": None, "error": None}


def save_checkpoint(out_dir, step, pieces, meta=None, rank=0, world_size=1, keep_last=3, keep_every=0,
                    background=False):
    """Every rank calls this with its share of the state, {tensor name: (tensor, first row, full shape)}
    (a 0-d tensor's first row is 0), copied to CPU memory here; rank 0 also with meta. Then each
    rank writes its file, and rank 0, once every rank's are there, meta.json and the rename; then it
    deletes all but the newest keep_last checkpoints (and those whose step is a multiple of
    keep_every). With background=True that happens in a thread while training goes on: its failure
    is then reported by checkpoint_failure() (train.py asks after every step) or wait_for_checkpoint()."""
    wait_for_checkpoint()
    pieces = {name: (tensor.detach().to("cpu", copy=True), row, list(shape)) for name, (tensor, row, shape) in pieces.items()}
    args = (out_dir, step, pieces, meta, rank, world_size, keep_last, keep_every)
    if not background:
        return _write_checkpoint(*args)

    def write():
        try:
            _write_checkpoint(*args)
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


def _durable(path, data=None):
    """Write data (bytes) to path, or take the file already there, and fsync it (a directory too)."""
    if data is not None:
        with open(path, "wb") as f:
            f.write(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_checkpoint(out_dir, step, pieces, meta, rank, world_size, keep_last, keep_every, wait_s=600):
    from safetensors.torch import save_file
    started = time.time()
    path = os.path.join(out_dir, f"ckpt_{step:07d}")
    tmp = path + ".tmp"
    try:
        os.makedirs(tmp, exist_ok=True)
        own = f"rank-{rank:05d}"
        rows = {name: [row, row + (len(t) if t.dim() else 1), shape, str(t.dtype).removeprefix("torch.")]
                for name, (t, row, shape) in pieces.items() if t.dim() == 0 or len(t)}
        if rows:
            save_file({f"{name}:{row}": pieces[name][0].contiguous() for name, (row, *_) in rows.items()},
                      os.path.join(tmp, own + ".safetensors"))
            os.chmod(os.path.join(tmp, own + ".safetensors"), os.stat(out_dir).st_mode & 0o666)  # not safetensors' 0600
            _durable(os.path.join(tmp, own + ".safetensors"))
        # last: this rank's part is complete. Renamed into place, so rank 0 never reads it half-written
        _durable(os.path.join(tmp, own + ".json.tmp"), json.dumps(rows).encode())
        os.replace(os.path.join(tmp, own + ".json.tmp"), os.path.join(tmp, own + ".json"))
        if rank != 0:
            return path
        deadline = time.time() + wait_s
        parts = {}
        for r in range(world_size):  # every rank's part, complete on disk
            while not os.path.exists(os.path.join(tmp, f"rank-{r:05d}.json")):
                if time.time() > deadline:
                    raise OSError(f"rank {r}'s part did not appear within {wait_s}s")
                time.sleep(0.05)
            with open(os.path.join(tmp, f"rank-{r:05d}.json")) as f:
                parts[r] = json.load(f)
        tensors = {}
        for r, part in parts.items():
            for name, (first, last, shape, dtype) in part.items():
                entry = tensors.setdefault(name, {"shape": shape, "dtype": dtype, "pieces": []})
                entry["pieces"].append([f"rank-{r:05d}.safetensors", first, last])
        _durable(os.path.join(tmp, "meta.json"), json.dumps({"format_version": FORMAT_VERSION, **meta, "tensors": tensors}).encode())
        _durable(tmp)
        os.replace(tmp, path)
        _durable(out_dir)  # the rename itself, durable
    except Exception as e:  # torch and safetensors report a failed write (disk full, file too large) their own ways
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(out_dir).free / 2**20 if os.path.isdir(out_dir) else 0
        raise OSError(f"checkpoint at step {step} not written: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]} "
                      f"(disk full? {free:,.0f} MiB free in {out_dir})") from e
    if keep_last > 0:  # only loadable checkpoints are here: one that failed to load was set aside
        for old in checkpoint_paths(out_dir)[:-keep_last]:
            if not (keep_every and int(CHECKPOINT_NAME.search(old).group(1)) % keep_every == 0):
                shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
    size = sum(os.path.getsize(f) for f in glob.glob(os.path.join(path, "*")))
    print(f"wrote {path} ({size / 2**20:,.1f} MiB) in {time.time() - started:.2f}s", flush=True)
    return path


# ---- reading ----------------------------------------------------------------------------------
def open_checkpoint(path, set_aside=False):
    """(meta, read): a checkpoint's metadata (everything but the tensors, with its "path") and
    read(name, first=None, last=None), which reads a tensor, or its rows [first, last), from disk.
    path: a checkpoint, a run directory (its newest checkpoint that loads: a newer one that does not
    is reported and, with set_aside, renamed *.corrupt so it never counts again), a Hugging Face
    model directory (hf:<dir>, or a directory with a config.json and no checkpoints), or a format 1
    ckpt_<step>.pt file."""
    if path.startswith("hf:"):
        return _open_hf(path[3:])
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "meta.json")):
        return _open_directory(path)
    if os.path.isdir(path) and not checkpoint_paths(path) and os.path.exists(os.path.join(path, "config.json")):
        return _open_hf(path)
    if os.path.isdir(path):
        candidates = checkpoint_paths(path)
        if not candidates:
            raise FileNotFoundError(f"no checkpoints (ckpt_*) in {path}")
        for candidate in reversed(candidates):
            try:
                return open_checkpoint(candidate)
            except (ValueError, FileNotFoundError) as e:  # FileNotFoundError: set aside meanwhile by rank 0
                print(f"warning: skipping {candidate}: {e}", flush=True)
                if set_aside and os.path.exists(candidate):
                    os.replace(candidate, candidate + ".corrupt")
                    print(f"warning: set {candidate} aside as {os.path.basename(candidate)}.corrupt", flush=True)
        raise ValueError(f"no checkpoint in {path} could be loaded")
    if os.path.isfile(path) and path.endswith(".pt"):
        return _open_format_1(path)
    raise FileNotFoundError(f"no checkpoint at {path}")


def _open_directory(path):
    from safetensors import safe_open
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format version {meta.get('format_version')}, not {FORMAT_VERSION}")
        files = {}
        for name, entry in meta["tensors"].items():
            rows = entry["shape"][0] if entry["shape"] else 1
            covered = sorted((first, last) for _, first, last in entry["pieces"])
            if [first for first, _ in covered] != [0] + [last for _, last in covered[:-1]] or covered[-1][1] != rows:
                raise ValueError(f"the rows of {name} are not all there")
            for file, _, _ in entry["pieces"]:
                if file not in files:  # reads the header only, and checks it against the file's length
                    files[file] = safe_open(os.path.join(path, file), framework="pt")
    except Exception as e:
        raise ValueError(f"{path} is incomplete or corrupt ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})") from None

    def read(name, first=None, last=None):
        entry = meta["tensors"][name]
        if not entry["shape"]:
            return files[entry["pieces"][0][0]].get_tensor(f"{name}:0")
        first, last = first or 0, entry["shape"][0] if last is None else last
        parts = [files[file].get_slice(f"{name}:{start}")[max(first, start) - start:min(last, end) - start]
                 for file, start, end in sorted(entry["pieces"], key=lambda piece: piece[1]) if start < last and end > first]
        return torch.cat(parts) if parts else torch.empty((0, *entry["shape"][1:]), dtype=getattr(torch, entry["dtype"]))
    return {**{k: v for k, v in meta.items() if k != "tensors"}, "path": path, "tensors": list(meta["tensors"])}, read


def _open_format_1(path):
    """A ckpt_<step>.pt of format 1, read whole (weights_only: plain data only); its optimizer states,
    numbered there, named by the order the optimizers were built in."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if type(e).__name__ == "UnpicklingError" and "Weights only load failed" in str(e):
            raise ValueError(f"{path} holds objects that would run code when loaded (not only tensors and plain "
                             f"data): refused, nothing in it was executed") from None
        raise ValueError(f"{path} is truncated or corrupt ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format_version") != 1:
        raise ValueError(f"{path} is not a checkpoint of format version 1 or {FORMAT_VERSION}")
    tensors = {f"model/{name}": t for name, t in checkpoint.pop("model").items()}
    config = checkpoint.get("config", {})
    with torch.device("meta"):
        model = GPT(ModelArgs(**checkpoint["model_args"]))
    names = {id(p): name for name, p in model.named_parameters()}
    built, _ = model.configure_optimizers(1.0, 0.0, (0.9, 0.95), bool(config.get("use_muon")))
    for kind, optimizer, state in zip(("adamw", "muon"), built, checkpoint.pop("optimizers", [])):
        order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
        for index, entry in state["state"].items():
            tensors.update({f"{kind}/{order[int(index)]}/{key}": value for key, value in entry.items()})
    checkpoint.pop("rng", None)

    def read(name, first=None, last=None):
        tensor = tensors[name]
        return tensor if tensor.dim() == 0 else tensor[first or 0:last]
    return {**checkpoint, "path": path, "tensors": list(tensors)}, read


def load_checkpoint(path, set_aside=False):
    """A whole checkpoint in CPU memory (open_checkpoint's metadata, and its tensors): "model" as
    {parameter: tensor}, "optimizers" as {"adamw" or "muon": {parameter: {key: tensor}}}."""
    meta, read = open_checkpoint(path, set_aside)
    checkpoint = {**meta, "model": {}, "optimizers": {}}
    for name in meta["tensors"]:
        kind, _, rest = name.partition("/")
        if kind == "model":
            checkpoint["model"][rest] = read(name)
        else:
            parameter, _, key = rest.rpartition("/")
            checkpoint["optimizers"].setdefault(kind, {}).setdefault(parameter, {})[key] = read(name)
    return checkpoint


def model_from_checkpoint(checkpoint, device="cpu"):
    """(model with the checkpoint's weights, its tokenizer)."""
    model = GPT(ModelArgs(**checkpoint["model_args"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(checkpoint["model"][name])
    return model.to(device), tok.tokenizer_from_state(checkpoint["tokenizer"])


def _open_hf(directory):
    """A Llama- or Qwen3-layout safetensors model and its byte-level BPE tokenizer, opened as a
    checkpoint of the weights alone (step 0, no optimizer state): what init_from='hf:<dir>' starts from."""
    from safetensors import safe_open
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
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"{directory}: no .safetensors files")
    where = {}  # our tensor name -> (open file, its name there)
    for file in files:
        handle = safe_open(os.path.join(directory, file), framework="pt")
        for key in handle.keys():
            where["model/" + key.removeprefix("model.")] = (handle, key)
    tie = config.get("tie_word_embeddings", False)
    if tie:  # one matrix for both: ours is the embedding's
        where.pop("model/lm_head.weight", None)
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

    def read(name, first=None, last=None):
        handle, key = where[name]
        rows = handle.get_slice(key)
        return rows[first or 0:rows.get_shape()[0] if last is None else last].float()
    return {"model_args": model_args, "tokenizer": tok.tokenizer_state(enc), "config": {}, "step": 0, "tokens_seen": 0,
            "parent": None, "path": "hf:" + directory, "tensors": list(where)}, read


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


_stop = {"signal": None}


def catch_stop_signals(rank):
    """From now on SIGTERM / SIGUSR1 (what SLURM and cloud schedulers send before they kill) and
    Ctrl-C are only recorded, for stop_signal(): train.py then finishes its step, checkpoints and
    exits 0. A second signal exits at once (a checkpoint being written stays a *.tmp)."""
    def on_signal(signum, frame):
        if _stop["signal"] is not None:
            os._exit(128 + signum)
        _stop["signal"] = signum
        print(f"rank {rank}: got {signal.Signals(signum).name}; stopping after this step with a checkpoint "
              f"(a second signal stops at once)", file=sys.stderr, flush=True)
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(signum, on_signal)


def stop_signal():
    """The stop signal received, or None."""
    return _stop["signal"]


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
