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

FORMAT_VERSION = 2
CHECKPOINT_NAME = re.compile(r"ckpt_(\d+)(\.pt)?$")
PART_STALL_S = 30  # rank 0 gives up on a rank whose part is this much later than the last one (or 3x its own write)


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
        # Every rank's part, complete on disk. The ranks write shares of about the same size at the
        # same time, so a part that is long overdue next to rank 0's own means a dead rank.
        own_s, last_arrival, parts = time.time() - started, time.time(), {}
        for r in range(world_size):
            while not os.path.exists(os.path.join(tmp, f"rank-{r:05d}.json")):
                waited = time.time() - last_arrival
                if waited > min(wait_s, max(PART_STALL_S, 3 * own_s)):
                    raise OSError(f"rank {r}'s part did not appear within {waited:.0f}s of the last one "
                                  f"(rank 0 wrote its own in {own_s:.1f}s): did rank {r} die?")
                time.sleep(0.05)
            last_arrival = time.time()
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
            if os.path.islink(old):  # a checkpoint linked in from elsewhere is the user's, never deleted
                continue
            if not (keep_every and int(CHECKPOINT_NAME.search(old).group(1)) % keep_every == 0):
                shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
    size = sum(os.path.getsize(f) for f in glob.glob(os.path.join(path, "*")))
    print(f"wrote {path} ({size / 2**20:,.1f} MiB) in {time.time() - started:.2f}s", flush=True)
    return path


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


def open_checkpoint(path, set_aside_corrupt=False, check_weights=False):
    """(meta, read): a checkpoint's metadata (everything but the tensors, with its "path") and
    read(name, first=None, last=None), which reads a tensor, or its rows [first, last), from disk;
    a weight that is not finite raises ValueError when it is read.
    path: a checkpoint, a run directory (its newest checkpoint that loads; with check_weights, whose
    weights are all read once and found finite: a newer one that does not is reported and, with
    set_aside_corrupt, set aside), a Hugging
    Face model directory (hf:<dir>, or a directory with a config.json and no checkpoints), or a
    format 1 ckpt_<step>.pt file. Everything is validated before it is returned: a damaged or
    hand-edited file raises ValueError naming the file and what is wrong."""
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
                meta, read = open_checkpoint(candidate)
                for name in meta["tensors"] if check_weights else []:
                    if name.startswith("model/"):
                        read(name)
                return meta, read
            except (ValueError, FileNotFoundError) as e:  # FileNotFoundError: set aside meanwhile by rank 0
                print(f"warning: skipping {candidate}: {e}", flush=True)
                if set_aside_corrupt and os.path.exists(candidate):
                    set_aside(candidate)
        raise ValueError(f"no checkpoint in {path} could be loaded")
    if os.path.isfile(path) and path.endswith(".pt"):
        return _open_format_1(path)
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


MODEL_ARG_TYPES = {"vocab_size": int, "block_size": int, "n_layer": int, "n_head": int, "n_kv_head": int, "n_embd": int,
                   "mlp_ratio": (int, float), "rope_base": (int, float), "qk_norm": bool, "tie_embeddings": bool,
                   "norm_eps": (int, float)}


def check_model_args(model_args, where):
    """The ModelArgs of a checkpoint's meta.json or a Hugging Face config, checked whole: ValueError otherwise."""
    _expect(f"{where}: model_args", model_args, dict, what="a dict")
    for key, kind in MODEL_ARG_TYPES.items():
        if key not in model_args and key != "norm_eps":
            raise ValueError(f"{where}: model_args lacks {key!r}")
        if key in model_args:
            _expect(f"{where}: model_args.{key}", model_args[key], kind, what=getattr(kind, "__name__", "a number"))
    unknown = set(model_args) - set(MODEL_ARG_TYPES)
    if unknown:
        raise ValueError(f"{where}: model_args has unknown keys {sorted(unknown)}")
    try:
        ModelArgs(**model_args).check()
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _expected_shapes(model_args):
    """{model/<parameter>: shape} of the model these arguments build (on the meta device: no memory)."""
    with torch.device("meta"):
        model = GPT(ModelArgs(**model_args))
    return {f"model/{name}": list(p.shape) for name, p in model.named_parameters()}


def _checked_read(path, read):
    """read, raising ValueError when a weight it reads is not finite (NaN bytes written into a file)."""
    def checked(name, first=None, last=None):
        tensor = read(name, first, last)
        if name.startswith("model/") and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: {name} holds values that are not finite (NaN or inf): the checkpoint is corrupt")
        return tensor
    return checked


def _open_directory(path):
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
        check_model_args(meta.get("model_args"), meta_path)
        tok.check_tokenizer_state(meta.get("tokenizer"), f"{meta_path}: tokenizer")
        tensors = _expect(f"{meta_path}: tensors", meta.get("tensors"), dict, what="a dict")
        for name, shape in _expected_shapes(meta["model_args"]).items():
            if name not in tensors:
                raise ValueError(f"{meta_path}: the tensor {name} is missing")
            if tensors[name].get("shape") != shape:
                raise ValueError(f"{meta_path}: {name} has shape {tensors[name].get('shape')}, the model {shape}")
        files = {}
        for name, entry in tensors.items():
            rows = entry["shape"][0] if entry["shape"] else 1
            covered = sorted((first, last) for _, first, last in entry["pieces"])
            if [first for first, _ in covered] != [0] + [last for _, last in covered[:-1]] or covered[-1][1] != rows:
                raise ValueError(f"{meta_path}: the rows of {name} are not all there")
            for file, first, last in entry["pieces"]:
                if file not in files:  # reads the header only, and checks it against the file's length
                    files[file] = safe_open(os.path.join(path, file), framework="pt")
                stored = files[file].get_slice(f"{name}:{first}").get_shape()
                if stored[:1] != ([last - first] if entry["shape"] else []) or stored[1:] != entry["shape"][1:]:
                    raise ValueError(f"{os.path.join(path, file)}: {name} rows {first}:{last} have shape {stored}, "
                                     f"not the {entry['shape']} of meta.json")
    except ValueError as e:
        raise ValueError(f"{path} is corrupt: {e}") from None
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
    return {**{k: v for k, v in meta.items() if k != "tensors"}, "path": path, "tensors": list(meta["tensors"])}, \
        _checked_read(path, read)


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


def load_checkpoint(path, set_aside_corrupt=False):
    """A whole checkpoint in CPU memory (open_checkpoint's metadata, and its tensors): "model" as
    {parameter: tensor}, "optimizers" as {"adamw" or "muon": {parameter: {key: tensor}}}."""
    meta, read = open_checkpoint(path, set_aside_corrupt)
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
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path} is not valid JSON ({e})") from None
    _expect(config_path, config, dict, what="a JSON object")
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size"):
        if key not in config:
            raise ValueError(f"{config_path} lacks {key!r}")
        _expect(f"{config_path}: {key}", config[key], int, 1, 2**24, what="an integer")
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
    check_model_args(model_args, config_path)
    if ModelArgs(**model_args).padded_vocab_size != config["vocab_size"]:
        raise ValueError(f"{directory}: vocab_size {config['vocab_size']} is not the tokenizer's {enc.n_vocab} "
                         f"padded to a multiple of 128")
    expected = _expected_shapes(model_args)
    for name, shape in expected.items():  # the weights there are the model config.json describes
        if name not in where:
            raise ValueError(f"{directory}: the weight {name.removeprefix('model/')} is missing (does num_hidden_layers="
                             f"{config['num_hidden_layers']} in {config_path} match the weights?)")
        stored = list(where[name][0].get_slice(where[name][1]).get_shape())
        if stored != shape:
            raise ValueError(f"{directory}: {where[name][1]} has shape {stored}, {config_path} says {shape}")
    extra = sorted(set(where) - set(expected))
    if extra:
        raise ValueError(f"{directory}: weights {config_path} does not describe, e.g. {extra[0].removeprefix('model/')} "
                         f"(does num_hidden_layers={config['num_hidden_layers']} match the weights?)")

    def read(name, first=None, last=None):
        handle, key = where[name]
        rows = handle.get_slice(key)
        return rows[first or 0:rows.get_shape()[0] if last is None else last].float()
    return {"model_args": model_args, "tokenizer": tok.tokenizer_state(enc), "config": {}, "step": 0, "tokens_seen": 0,
            "parent": None, "path": "hf:" + directory, "tensors": list(where)}, _checked_read(directory, read)
