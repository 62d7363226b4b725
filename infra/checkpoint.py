"""
Checkpoints: the one way to write and read them (train.py, sample.py, export_hf.py, evaluate.py),
and to name the training state in them. A Hugging Face model directory opens as one too
(init_from='hf:<dir>', import_hf.py). Where a run starts, and what it saves: resume.py.

A checkpoint is a directory, out_dir/ckpt_<step>/, of safetensors and JSON files only, so reading
one never runs anything:
    meta.json              format_version 2, step, tokens_seen, batch_size, model_args, config,
                           tokenizer (the whole tokenizer as text: a checkpoint decodes on its own),
                           data_dir, parent (the checkpoint this run's weights started from), val_loss
                           and best_val_loss, every tensor's shape, dtype and pieces (which file holds
                           which rows), and each file's sha256 ("files"; absent in older checkpoints)
    rank-NNNNN.safetensors the rows each rank wrote
The tensors: model/<parameter>, and <optimizer>/<parameter>/<key> for each optimizer by the name
train.py gives it (adamw/<parameter>/<exp_avg, exp_avg_sq or step>, muon/<parameter>/momentum_buffer
and, with neuron_norm, second_moment): the whole training state as one process would hold it,
whatever the world size and the mode (DDP, FSDP2) that wrote it, so it loads at any world size and
in either mode, and a rank can read just the rows it needs. Each rank writes its own share at once
(its shards under FSDP2, a slice of the replicas under DDP: parallel.share_to_write): no rank ever
holds the whole state.
Writes are atomic: each rank writes into ckpt_<step>.tmp/ (in a background thread, from a CPU copy
of its share, hashing the bytes as they go out), and rank 0 renames the directory once every rank's
files are complete; a crash at any instant leaves the earlier checkpoints and at most a *.tmp
directory, which nothing loads and the next start removes. Reading validates a checkpoint whole
(meta.json's keys, types and ranges, the directory's step, every tensor's dtype and shape against the
model and the optimizer state it describes, the safetensors headers). A verified read (a resume's
rank 0, load_checkpoint) reads each file once into memory, checks its sha256 and every value for
being finite, and serves the tensors from there; otherwise every tensor read is checked for being
finite. A checkpoint that fails any of it is set aside as ckpt_<step>.corrupt and the one before it
is used. The data position is the step: the windows of a step are a function of (seed, step).
"""
import glob
import hashlib
import json
import math
import os
import re
import shutil
import threading
import time

import torch

from infra.import_hf import open_hf
from model import GPT, ModelArgs, check_model_args, parameter_shapes
from infra.rundir import stop_signal
import tokenizer as tok

FORMAT_VERSION = 2
CHECKPOINT_NAME = re.compile(r"ckpt_(\d+)$")
PART_STALL_S = 30  # rank 0 gives up on a rank whose part is this much later than the last one (or 3x its own write)


def checkpoint_path(out_dir, step):
    return os.path.join(out_dir, f"ckpt_{step:07d}")


def checkpoint_paths(out_dir):
    """The checkpoints in out_dir (directories ckpt_<step>), oldest first."""
    paths = [p for p in glob.glob(os.path.join(out_dir, "ckpt_*")) if CHECKPOINT_NAME.search(p)]
    return sorted(paths, key=lambda p: int(CHECKPOINT_NAME.search(p).group(1)))


def remove_stale_writes(out_dir):
    """Temporary directories of writes that a crash interrupted: nothing loads them."""
    for stale in glob.glob(os.path.join(out_dir, "ckpt_*.tmp")):
        shutil.rmtree(stale) if os.path.isdir(stale) else os.remove(stale)


# ---- writing ----------------------------------------------------------------------------------
_pending_write = {"thread": None, "error": None}


def save_checkpoint(out_dir, step, pieces, meta=None, *, rank=0, world_size=1, keep_last=3, keep_every=0,
                    background=False):
    """Every rank calls this with its share of the state, {tensor name: (tensor, first row, full shape)}
    (a 0-d tensor's first row is 0), copied to CPU memory here; rank 0 also with meta. Then each
    rank writes its file, and rank 0, once every rank's are there, meta.json and the rename; then it
    deletes all but the newest keep_last checkpoints (and those whose step is a multiple of
    keep_every). With background=True that happens in a thread while training goes on: its failure
    is then reported by checkpoint_failure() (train.py asks after every step) or wait_for_checkpoint()."""
    wait_for_checkpoint()
    pieces = {
        name: (tensor.detach().to("cpu", copy=True), row, list(shape)) for name, (tensor, row, shape) in pieces.items()
    }
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


def _write_and_sync(path, data=None):
    """Write data (bytes) to path, or take the file already there, and fsync it (a directory too)."""
    if data is not None:
        with open(path, "wb") as f:
            f.write(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_safetensors(path, tensors):
    """tensors ({key: float32 tensor}) written to path in the safetensors format, streamed (no second copy
    in memory) through sha256; returns the digest, which meta.json records and a verified open checks."""
    header, offset = {}, 0
    for key, t in tensors.items():
        if t.dtype != torch.float32:
            raise ValueError(f"{key} is {t.dtype}: a checkpoint holds float32 only")
        header[key] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + 4 * t.numel()]}
        offset += 4 * t.numel()
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data 8-byte aligned, as safetensors writes it
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (len(head).to_bytes(8, "little"), head,
                      *(t.contiguous().view(-1).numpy().data for t in tensors.values() if t.numel())):
            digest.update(chunk)
            f.write(chunk)
    return digest.hexdigest()


def _write_checkpoint(out_dir, step, pieces, meta, rank, world_size, keep_last, keep_every, wait_s=600):
    started = time.time()
    path = checkpoint_path(out_dir, step)
    tmp = path + ".tmp"
    try:
        os.makedirs(tmp, exist_ok=True)
        own = f"rank-{rank:05d}"
        rows = {name: [row, row + (len(t) if t.dim() else 1), shape, str(t.dtype).removeprefix("torch.")]
                for name, (t, row, shape) in pieces.items() if t.dim() == 0 or len(t)}
        sha256 = None
        if rows:
            sha256 = _write_safetensors(os.path.join(tmp, own + ".safetensors"),
                                        {f"{name}:{row}": pieces[name][0] for name, (row, *_) in rows.items()})
            _write_and_sync(os.path.join(tmp, own + ".safetensors"))
        # last: this rank's part is complete. Renamed into place, so rank 0 never reads it half-written
        _write_and_sync(os.path.join(tmp, own + ".json.tmp"), json.dumps({"rows": rows, "sha256": sha256}).encode())
        os.replace(os.path.join(tmp, own + ".json.tmp"), os.path.join(tmp, own + ".json"))
        if rank != 0:
            return path
        # Every rank's part, complete on disk. The ranks write shares of about the same size at the
        # same time, so a part that is long overdue next to rank 0's own means a dead rank.
        own_s, last_arrival, parts = time.time() - started, time.time(), {}
        for r in range(world_size):
            while not os.path.exists(os.path.join(tmp, f"rank-{r:05d}.json")):
                waited = time.time() - last_arrival
                if not threading.main_thread().is_alive() and stop_signal() is not None:
                    raise OSError(f"rank {r}'s part never came: this rank's training failed and the launcher is "
                                  f"stopping the job (a rank died?)")  # the job is being torn down: no waiting
                if waited > min(wait_s, max(PART_STALL_S, 3 * own_s)):
                    raise OSError(f"rank {r}'s part did not appear within {waited:.0f}s of the last one "
                                  f"(rank 0 wrote its own in {own_s:.1f}s): did rank {r} die?")
                time.sleep(0.05)
            last_arrival = time.time()
            with open(os.path.join(tmp, f"rank-{r:05d}.json")) as f:
                parts[r] = json.load(f)
        tensors, files = {}, {}
        for r, part in parts.items():
            for name, (first, last, shape, dtype) in part["rows"].items():
                entry = tensors.setdefault(name, {"shape": shape, "dtype": dtype, "pieces": []})
                entry["pieces"].append([f"rank-{r:05d}.safetensors", first, last])
            if part["sha256"] is not None:
                files[f"rank-{r:05d}.safetensors"] = {"sha256": part["sha256"]}
        _write_and_sync(
            os.path.join(tmp, "meta.json"),
            json.dumps({"format_version": FORMAT_VERSION, **meta, "tensors": tensors, "files": files}).encode(),
        )
        _write_and_sync(tmp)
        os.replace(tmp, path)
        _write_and_sync(out_dir)  # the rename itself, durable
    except Exception as e:  # torch and safetensors report a failed write (disk full, file too large) their own ways
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(out_dir).free / 2**20 if os.path.isdir(out_dir) else 0
        raise OSError(
            f"checkpoint at step {step} not written: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]} "
            f"(disk full? {free:,.0f} MiB free in {out_dir})"
        ) from e
    rotate(out_dir, keep_last, keep_every)
    size = sum(os.path.getsize(f) for f in glob.glob(os.path.join(path, "*")))
    print(f"wrote {path} ({size / 2**20:,.1f} MiB) in {time.time() - started:.2f}s", flush=True)
    return path


def rotate(out_dir, keep_last, keep_every):
    """Delete all but the newest keep_last checkpoints, keeping those whose step is a multiple of
    keep_every, the one with the lowest val loss (meta.json's val_loss: what a user would go back to after
    a slow degradation) and any linked in from elsewhere (the user's). Only loadable checkpoints are
    here: one that failed to load was set aside."""
    if keep_last <= 0:
        return
    paths = checkpoint_paths(out_dir)

    def val_loss(path):
        try:
            with open(os.path.join(path, "meta.json")) as f:
                value = json.load(f).get("val_loss")
            return value if isinstance(value, (int, float)) and math.isfinite(value) else math.inf
        except (OSError, ValueError, AttributeError):
            return math.inf
    losses = {path: val_loss(path) for path in paths}
    best = min(paths, key=lambda p: losses[p]) if any(math.isfinite(v) for v in losses.values()) else None
    for old in paths[:-keep_last]:
        if os.path.islink(old) or old == best:
            continue
        if not (keep_every and int(CHECKPOINT_NAME.search(old).group(1)) % keep_every == 0):
            shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)


# ---- reading ----------------------------------------------------------------------------------
def set_aside_paths(out_dir):
    """The checkpoints of out_dir that failed to load and were set aside (ckpt_<step>.corrupt[-N])."""
    return sorted(glob.glob(os.path.join(out_dir, "ckpt_*.corrupt*")))


def set_aside(path):
    """Rename a checkpoint that does not load to a name no later one can collide with, so it never
    counts again and is never overwritten: ckpt_<step>.corrupt, then .corrupt-2, .corrupt-3, ..."""
    target, n = path + ".corrupt", 1
    while os.path.lexists(target):
        n += 1
        target = f"{path}.corrupt-{n}"
    os.replace(path, target)
    print(f"warning: set {path} aside as {os.path.basename(target)}", flush=True)
    return target


def open_checkpoint(path, set_aside_corrupt=False, verify=False):
    """(meta, read): a checkpoint's metadata (everything but the tensors, with its "path") and
    read(name, first=None, last=None), which reads a tensor, or its rows [first, last); a weight that
    is not finite raises ValueError when it is read.
    path: a checkpoint, a run directory (its newest checkpoint that opens: a newer one that does not
    is reported and, with set_aside_corrupt, set aside), or a Hugging Face model directory (hf:<dir>,
    or a directory with a config.json and no checkpoints).
    verify: every file read whole, once, into memory, its sha256 checked against meta.json's and every
    tensor found finite; read then serves from that memory (a resume reads each byte once).
    Everything is validated before it is returned: a damaged or hand-edited file raises ValueError
    naming the file and what is wrong."""
    if path.startswith("hf:") or (os.path.isdir(path) and not checkpoint_paths(path)
                                   and os.path.exists(os.path.join(path, "config.json"))):
        directory = path.removeprefix("hf:")
        meta, read_weight = open_hf(directory)  # by parameter name: the weights only, named here as ours are
        meta["tensors"] = [f"model/{name}" for name in meta.pop("parameters")]
        return meta, _checked_read(directory, lambda name, first=None, last=None: read_weight(
            name.removeprefix("model/"), first, last))
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "meta.json")):
        return _open_directory(path, verify)
    if os.path.isdir(path):
        tried = set()
        while candidates := [c for c in checkpoint_paths(path) if c not in tried]:
            candidate = candidates[-1]
            tried.add(candidate)
            try:
                return open_checkpoint(candidate, verify=verify)
            except (ValueError, FileNotFoundError) as e:
                if not os.path.exists(candidate):  # rotated away (or set aside) by the run writing path
                    print(f"note: {candidate} was removed while it was read (by the run that writes "
                          f"{path}?): trying the newest one left", flush=True)
                    continue
                print(f"warning: skipping {candidate}: {e}", flush=True)
                if set_aside_corrupt:
                    set_aside(candidate)
        if not tried:
            raise FileNotFoundError(f"no checkpoints (ckpt_*) in {path}")
        raise ValueError(f"no checkpoint in {path} could be loaded")
    raise FileNotFoundError(f"no checkpoint at {path}")


def _expect(where, value, kind, low=None, high=None, what="a value"):
    """value, if it is a kind (bool is never an int here) within [low, high]; else ValueError naming where."""
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, (int, float)))
    if ok and low is not None:
        ok = low <= value <= high
    if not ok:
        bounds = f" in [{low}, {high}]" if low is not None else ""
        raise ValueError(f"{where} must be {what}{bounds}, got {value!r}")
    return value


def _check_tensor_index(meta_path, tensors, shapes):
    """meta.json's tensor index against the model's parameter shapes: every weight there with its shape,
    everything float32 (what training writes), and optimizer state (<optimizer>/<parameter>/<key>), if
    any, whole: each parameter's from one optimizer, shaped as the parameter, one value per row or
    column (Muon's), or a scalar; AdamW's exactly exp_avg and exp_avg_sq shaped as the parameter and a
    scalar step. ValueError naming the first tensor that is not so."""
    for name, shape in shapes.items():
        if f"model/{name}" not in tensors:
            raise ValueError(f"{meta_path}: the tensor model/{name} is missing")
        if tensors[f"model/{name}"].get("shape") != shape:
            raise ValueError(f"{meta_path}: model/{name} has shape {tensors[f'model/{name}'].get('shape')}, "
                             f"the model {shape}")
    state = {}  # {parameter: {optimizer: {keys}}}
    for name, entry in tensors.items():
        if not isinstance(entry, dict) or entry.get("dtype") != "float32" or not isinstance(entry.get("shape"), list):
            raise ValueError(f"{meta_path}: {name} is not float32 (training writes nothing else): {str(entry)[:80]}")
        kind, _, rest = name.partition("/")
        if kind == "model":
            continue
        parameter, _, key = rest.rpartition("/")
        if parameter not in shapes:
            raise ValueError(f"{meta_path}: {name} is the state of no parameter of this model")
        full = shapes[parameter]
        shaped = entry["shape"] == [] or (len(entry["shape"]) == len(full) and all(
            size in (whole, 1) for size, whole in zip(entry["shape"], full)))  # or one per row/col
        if not shaped or (kind == "adamw" and entry["shape"] != ([] if key == "step" else full)):
            raise ValueError(f"{meta_path}: {name} has shape {entry['shape']}, not its parameter's")
        state.setdefault(parameter, {}).setdefault(kind, set()).add(key)
    if state:  # a training state: whole, or not at all
        for parameter in shapes:
            kinds = state.get(parameter, {})
            if len(kinds) != 1 or kinds.get("adamw", {"exp_avg", "exp_avg_sq", "step"}) != {"exp_avg", "exp_avg_sq",
                                                                                               "step"}:
                raise ValueError(f"{meta_path}: the optimizer state of {parameter} is missing or incomplete")


def _checked_read(path, read):
    """read, raising ValueError when a tensor it reads (a weight or optimizer state) is not finite (NaN
    bytes written into a file)."""
    def checked(name, first=None, last=None):
        tensor = read(name, first, last)
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: {name} holds values that are not finite (NaN or inf): the checkpoint is corrupt")
        return tensor
    return checked


def _read_verified(path, sha256):
    """{key: tensor} of a safetensors file read whole, once, into one buffer the tensors are views of;
    ValueError if its sha256 is not the one given (None: an older checkpoint, which recorded none) or a
    tensor is not finite. The header was validated by safe_open before."""
    with open(path, "rb") as f:
        data = bytearray(os.fstat(f.fileno()).st_size)
        view, done = memoryview(data), 0
        while done < len(data) and (n := f.readinto(view[done:])):
            done += n
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{path}: its content is not what was written (sha256 differs from meta.json's)")
    size = int.from_bytes(data[:8], "little")
    tensors = {}
    for key, info in json.loads(data[8 : 8 + size]).items():
        if key != "__metadata__":
            first, last = info["data_offsets"]
            flat = torch.frombuffer(data, dtype=torch.float32, offset=8 + size + first, count=(last - first) // 4) \
                if last > first else torch.empty(0)
            tensors[key] = flat.view(info["shape"])
            if not torch.isfinite(tensors[key]).all():
                raise ValueError(f"{path}: {key} holds values that are not finite (NaN or inf)")
    return tensors


def _open_directory(path, verify=False):
    from safetensors import safe_open
    meta_path = os.path.join(path, "meta.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        _expect(meta_path, meta, dict, what="a JSON object")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format version {meta.get('format_version')}, not {FORMAT_VERSION}")
        for key, kind in [("step", int), ("tokens_seen", int)]:
            _expect(f"{meta_path}: {key}", meta.get(key), kind, 0, 2**62, what="an integer")
        _expect(f"{meta_path}: config", meta.get("config"), dict, what="a dict")
        for key in ("val_loss", "best_val_loss"):  # absent in older checkpoints; None without evaluations
            if meta.get(key) is not None:
                _expect(f"{meta_path}: {key}", meta[key], (int, float), -1e30, 1e30, what="a finite number")
        model_args = check_model_args(meta.get("model_args"), meta_path)
        tok.check_tokenizer_state(meta.get("tokenizer"), f"{meta_path}: tokenizer")
        tensors = _expect(f"{meta_path}: tensors", meta.get("tensors"), dict, what="a dict")
        named = CHECKPOINT_NAME.search(os.path.basename(os.path.normpath(path)))
        if named and int(named.group(1)) != meta["step"]:
            raise ValueError(f"{meta_path}: step {meta['step']}, but the directory is named for step {named.group(1)}")
        _check_tensor_index(meta_path, tensors, parameter_shapes(model_args))
        checksums = _expect(f"{meta_path}: files", meta.get("files", {}), dict, what="a dict")  # absent: older
        for file, entry in checksums.items():
            if not (isinstance(entry, dict) and re.fullmatch(r"[0-9a-f]{64}", str(entry.get("sha256")))):
                raise ValueError(f"{meta_path}: files: {file} has no valid sha256")
        files, loaded = {}, {}
        for name, entry in tensors.items():
            rows = entry["shape"][0] if entry["shape"] else 1
            covered = sorted((first, last) for _, first, last in entry["pieces"])
            if [first for first, _ in covered] != [0] + [last for _, last in covered[:-1]] or covered[-1][1] != rows:
                raise ValueError(f"{meta_path}: the rows of {name} are not all there")
            for file, first, last in entry["pieces"]:
                if file not in files:  # reads the header only, and checks it against the file's length
                    files[file] = safe_open(os.path.join(path, file), framework="pt")
                stored = files[file].get_slice(f"{name}:{first}")
                if stored.get_shape()[:1] != ([last - first] if entry["shape"] else []) \
                        or stored.get_shape()[1:] != entry["shape"][1:] or stored.get_dtype() != "F32":
                    raise ValueError(f"{os.path.join(path, file)}: {name} rows {first}:{last} are "
                                     f"{stored.get_dtype()} of shape {stored.get_shape()}, not the float32 "
                                     f"{entry['shape']} of meta.json")
        if checksums and set(checksums) != set(files):
            raise ValueError(f"{meta_path}: files lists {sorted(checksums)}, the tensors are in {sorted(files)}")
        for file in files if verify else []:
            loaded[file] = _read_verified(os.path.join(path, file), checksums.get(file, {}).get("sha256"))
    except ValueError as e:
        raise ValueError(f"{path} is corrupt: {e}") from None
    except Exception as e:
        raise ValueError(
            f"{path} is incomplete or corrupt ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})"
        ) from None

    def stored(file, key):  # from memory when verified, else sliced from the file on disk
        return loaded[file][key] if file in loaded else files[file].get_slice(key)

    def read(name, first=None, last=None):
        entry = meta["tensors"][name]
        if not entry["shape"]:
            file, key = entry["pieces"][0][0], f"{name}:0"
            return loaded[file][key].clone() if file in loaded else files[file].get_tensor(key)
        first, last = first or 0, entry["shape"][0] if last is None else last
        parts = [
            stored(file, f"{name}:{start}")[max(first, start) - start : min(last, end) - start]
            for file, start, end in sorted(entry["pieces"], key=lambda piece: piece[1])
            if start < last and end > first
        ]
        return (
            torch.cat(parts) if parts else torch.empty((0, *entry["shape"][1:]), dtype=getattr(torch, entry["dtype"]))
        )
    info = {k: v for k, v in meta.items() if k not in ("tensors", "files")}
    # verified: every value was found finite as it was read in, so the reads need no second look
    return {**info, "path": path, "tensors": list(meta["tensors"])}, read if verify else _checked_read(path, read)


def load_checkpoint(path, set_aside_corrupt=False):
    """A whole checkpoint in CPU memory (open_checkpoint's metadata, and its tensors): "model" as
    {parameter: tensor}, "optimizers" as {optimizer name: {parameter: {key: tensor}}}."""
    meta, read = open_checkpoint(path, set_aside_corrupt, verify=True)
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
