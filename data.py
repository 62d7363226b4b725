"""
Token datasets on disk and the windows training draws from them.

A dataset is a directory written by prepare.py: meta.json, the tokenizer, and per split
({train,val}_NNNNNN.bin) shards of tokens; a chat dataset also has {train,val}_mask_NNNNNN.bin,
one byte per token, 1 where the token is a target finetuning learns (the assistant's words).
A shard is a 32-byte header (magic, format version, bytes per token, token count) followed by the
tokens, little-endian, so it memory-maps without a copy.

Training draws windows of block_size + 1 tokens (inputs, and targets shifted by one). In a text
dataset a window starts anywhere; in a chat dataset it starts at a conversation's first token
(<|endoftext|>) and runs on into the following conversations, so every window is packed full and
only a conversation longer than the window is cut (prepare.py and train.py report how many).
A mixture draws each window's dataset by weight. Every draw is a function of a seed tuple alone
(train.py uses (seed, step)), which is what makes resuming, and changing the world size, exact.
"""
from dataclasses import dataclass, field
import json
import os
import struct
import zlib

import numpy as np

SHARD_MAGIC = b"GPTOKENS"
SHARD_VERSION = 1
SHARD_HEADER = struct.Struct("<8sIIQQ")  # magic, version, bytes per token, token count, reserved: 32 bytes
TOKEN_DTYPES = {1: np.uint8, 2: np.uint16, 4: np.uint32}
# The loss mask, from the shard on disk to the loss: a chat dataset's mask byte 0 makes read_windows
# write this target id, which model.GPT's cross-entropy ignores (ignore_index).
NOT_LEARNED = -1


def ceil_div(a, b):
    """a / b rounded up, for integers (the size of the largest of b equal shares of a)."""
    return -(-a // b)


def split_of(name, val_fraction):
    """'train' or 'val' for a document, from a hash of its name alone (prepare.py's split: the same
    whatever the order or the number of workers). Documents named <doc>@<item> (the demo's questions
    on a module or a topic) go where <doc> goes."""
    key = name.split("@")[0]
    return "val" if zlib.crc32(key.encode()) % 1_000_000 < val_fraction * 1_000_000 else "train"


def write_shard(path, tokens):
    tokens = np.asarray(tokens)
    with open(path, "wb") as f:
        f.write(SHARD_HEADER.pack(SHARD_MAGIC, SHARD_VERSION, tokens.dtype.itemsize, len(tokens), 0))
        f.write(tokens.astype(tokens.dtype.newbyteorder("<"), copy=False).tobytes())


@dataclass
class Dataset:
    """A prepared dataset, memory-mapped (open_dataset). tokens, masks, starts and offsets hold, per
    split ('train', 'val'), a list with one entry per shard: the shard's tokens; its loss mask (masks
    is None for a text dataset); the cumulative count of the windows that can start in the shards up
    to it; and the offsets windows start at, or None for anywhere (offsets is None then)."""
    directory: str
    meta: dict
    tokens: dict = field(default_factory=dict)
    masks: dict = field(default_factory=dict)
    starts: dict = field(default_factory=dict)
    offsets: dict = field(default_factory=dict)
    truncated: int = 0  # training conversations longer than a window (cut to it)


def read_shard(path):
    """Memory-map a shard's tokens (no copy); a file that is not a complete shard raises ValueError."""
    with open(path, "rb") as f:
        header = f.read(SHARD_HEADER.size)
    if len(header) < SHARD_HEADER.size:
        raise ValueError(f"{path}: too short to be a token shard")
    magic, version, bytes_per_token, count, _ = SHARD_HEADER.unpack(header)
    if magic != SHARD_MAGIC or version != SHARD_VERSION or bytes_per_token not in TOKEN_DTYPES:
        raise ValueError(f"{path}: not a token shard of format version {SHARD_VERSION} (re-run prepare.py)")
    expected_size = SHARD_HEADER.size + count * bytes_per_token
    if os.path.getsize(path) != expected_size:
        raise ValueError(f"{path}: truncated or corrupt ({os.path.getsize(path)} bytes, header says {expected_size})")
    return np.memmap(path, dtype=np.dtype(TOKEN_DTYPES[bytes_per_token]).newbyteorder("<"), mode="r",
                     offset=SHARD_HEADER.size, shape=(count,))


class ShardWriter:
    """Appends documents to {name}_NNNNNN.bin files, starting a new shard at a document boundary
    once the current one holds shard_tokens tokens. Keeps each shard's largest token id (max_ids),
    which meta.json records so that opening a dataset can check them against the vocabulary."""

    def __init__(self, directory, name, dtype, shard_tokens):
        self.directory, self.name, self.dtype, self.shard_tokens = directory, name, np.dtype(dtype), shard_tokens
        self.file, self.shards, self.max_ids, self.count, self.total, self.documents = None, [], [], 0, 0, 0

    def add(self, tokens):
        if self.file is None or self.count >= self.shard_tokens:
            self.close()
            name = f"{self.name}_{len(self.shards):06d}.bin"
            self.shards.append(name)
            self.max_ids.append(0)
            self.file = open(os.path.join(self.directory, name), "wb")
            self.file.write(SHARD_HEADER.pack(SHARD_MAGIC, SHARD_VERSION, self.dtype.itemsize, 0, 0))
            self.count = 0
        tokens = np.asarray(tokens)
        if len(tokens):
            self.max_ids[-1] = max(self.max_ids[-1], int(tokens.max()))
        self.file.write(tokens.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
        self.count += len(tokens)
        self.total += len(tokens)
        self.documents += 1

    def close(self):
        if self.file is not None:  # the real count goes into the header only once the shard is complete
            self.file.seek(0)
            self.file.write(SHARD_HEADER.pack(SHARD_MAGIC, SHARD_VERSION, self.dtype.itemsize, self.count, 0))
            self.file.close()
            self.file = None


def meta_problem(meta):
    """What is wrong with a dataset's meta.json (as prepare.py writes it), or None."""
    def integer(value, low, high):
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    if not isinstance(meta, dict):
        return "not a JSON object"
    if meta.get("format_version") != SHARD_VERSION:
        return f"format_version is {meta.get('format_version')!r}, not {SHARD_VERSION}"
    if not integer(meta.get("vocab_size"), 1, 2**32):
        return f"vocab_size must be an integer in [1, 2**32], got {meta.get('vocab_size')!r}"
    if not integer(meta.get("bos_id"), 0, meta["vocab_size"] - 1):
        return f"bos_id must be a token id below vocab_size={meta['vocab_size']}, got {meta.get('bos_id')!r}"
    if not isinstance(meta.get("splits"), dict):
        return "splits is missing or not a dict"
    for split in ("train", "val"):
        info = meta["splits"].get(split)
        if not isinstance(info, dict) or not isinstance(info.get("shards"), list) or not info["shards"] \
                or not all(isinstance(name, str) and "/" not in name for name in info["shards"]):
            return f"splits.{split}.shards must be a list of shard file names"
        if any(name in (".", "..") or "\\" in name for name in info["shards"] + (info.get("masks") or [])):
            return f"splits.{split} names a file outside the dataset's directory"
        if meta.get("chat") and not (isinstance(info.get("masks"), list) and len(info["masks"]) == len(info["shards"])
                                     and all(isinstance(name, str) and "/" not in name for name in info["masks"])):
            return f"splits.{split}.masks must name one mask file per shard"
        max_ids = info.get("max_token_ids")
        if max_ids is not None and not (isinstance(max_ids, list) and len(max_ids) == len(info["shards"])
                                        and all(integer(m, 0, 2**32) for m in max_ids)):
            return f"splits.{split}.max_token_ids must be a list of one integer per shard"
        if not integer(info.get("tokens", 0), 0, 2**62) or not integer(info.get("bytes", 0), 0, 2**62) \
                or not integer(info.get("learned_tokens", 0), 0, 2**62):
            return f"splits.{split}.tokens, .bytes and .learned_tokens must be integers >= 0"
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    if set(train["shards"] + (train.get("masks") or [])) & set(val["shards"] + (val.get("masks") or [])):
        return "the train and val splits share a file: the val split must be held out"
    return None


def read_json(path, *, fix):
    """The object in a JSON file (a dataset's meta.json, a Hugging Face config.json); ValueError naming
    the file, what is wrong with it, and fix, what to do about it."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is corrupt ({type(e).__name__}: {e}): {fix}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} is corrupt (not a JSON object): {fix}")
    return value


def write_meta(directory, meta):
    """A dataset's meta.json (prepare.py's record of it), checked as open_dataset will check it."""
    meta = {"format_version": SHARD_VERSION, **meta}
    problem = meta_problem(meta)
    if problem:
        raise ValueError(f"{directory}/meta.json would be invalid: {problem}")
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


def val_fraction_for(val_tokens, total_tokens):
    """The --val_fraction that gives a val split of val_tokens out of total_tokens with a 20% margin
    (documents fall in a split by their name's hash), to two figures, at least 0.01; None above one half."""
    fraction = 1.2 * val_tokens / max(1, total_tokens)
    return None if fraction > 0.5 else max(0.01, float(f"{fraction:.2g}"))


def val_split_advice(val_tokens, total_tokens):
    """What to prepare the data with for a val split of val_tokens: a --val_fraction, or more data."""
    fraction = val_fraction_for(val_tokens, total_tokens)
    return (f"prepare the data again with --val_fraction={fraction} (or more)" if fraction is not None else
            f"the dataset ({total_tokens:,} tokens) is too small to hold {val_tokens:,} out: use more data")


def val_split_warnings(datasets, *, eval_iters, tokens_per_eval_iter):
    """Warnings on datasets whose val split is under half what an evaluation would read (a val loss
    on so few tokens is noise), and on conversations longer than a window (they are cut)."""
    warnings, tokens_per_evaluation = [], eval_iters * tokens_per_eval_iter
    for d in datasets:
        val_tokens = d.meta["splits"]["val"]["tokens"]
        if tokens_per_evaluation > 2 * val_tokens:
            total = val_tokens + d.meta["splits"]["train"]["tokens"]
            warnings.append(f"warning: the val split of {d.directory} holds only {val_tokens:,} tokens, under half "
                            f"the {tokens_per_evaluation:,} an evaluation could read (eval_iters x micro_batch_size x "
                            f"world size x block_size): a val loss on so few is noisy; "
                            f"{val_split_advice(tokens_per_evaluation // 2, total)}, or evaluate less: "
                            f"--eval_iters={max(1, 2 * val_tokens // tokens_per_eval_iter)}")
        if d.truncated:
            warnings.append(f"{d.directory}: {d.truncated} training conversations are longer than a window "
                            f"(block_size + 1 tokens) and will be cut")
    return warnings


def open_dataset(directory, block_size, align_to_documents=False):
    """The prepared dataset in directory, memory-mapped, its meta.json and shards checked. Its windows
    start at a document's first token in a chat dataset, and in a text dataset when align_to_documents."""
    meta_path = os.path.join(directory, "meta.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"no dataset at {directory} (no meta.json): run python prepare.py first")
    meta = read_json(meta_path, fix="prepare the dataset again")
    problem = meta_problem(meta)
    if problem:
        raise ValueError(f"{meta_path} is corrupt: {problem}; prepare the dataset again")
    dataset = Dataset(directory, meta)
    chat = bool(meta.get("chat"))
    for split in ("train", "val"):
        info = meta["splits"][split]
        tokens = [read_shard(os.path.join(directory, name)) for name in info["shards"]]
        # an id past the vocabulary would train silently (below the padded size) or crash deep in torch
        max_ids = info.get("max_token_ids") or [int(shard.max()) if len(shard) else 0 for shard in tokens]
        for name, max_id in zip(info["shards"], max_ids):
            if max_id >= meta["vocab_size"]:
                raise ValueError(f"{os.path.join(directory, name)} holds token id {max_id}, outside the vocabulary of "
                                 f"{meta['vocab_size']} in {meta_path}: prepare the dataset again")
        dataset.tokens[split] = tokens
        dataset.masks[split] = [read_shard(os.path.join(directory, name)) for name in info["masks"]] if chat else None
        for name, shard, mask in zip(info["shards"], tokens, dataset.masks[split] or []):
            if len(mask) != len(shard):
                raise ValueError(f"{os.path.join(directory, name)} holds {len(shard):,} tokens but its mask "
                                 f"{mask.filename} {len(mask):,}: prepare the dataset again")
        for name, shard in zip(info["shards"], tokens):
            if shard.dtype.itemsize < 4 and meta["vocab_size"] > 256 ** shard.dtype.itemsize:
                raise ValueError(f"{meta_path}: vocab_size {meta['vocab_size']} does not fit the "
                                 f"{shard.dtype.itemsize}-byte tokens of {name}: prepare the dataset again")
        if chat or align_to_documents:  # windows start at a document's first token and must fit in the shard
            offsets = []
            for shard in tokens:
                bos_positions = np.flatnonzero(np.asarray(shard) == meta["bos_id"])
                lengths = np.diff(np.append(bos_positions, len(shard)))
                if split == "train":
                    dataset.truncated += int((lengths > block_size + 1).sum())
                offsets.append(bos_positions[bos_positions + block_size + 1 <= len(shard)])
            dataset.offsets[split] = offsets
            counts = np.array([len(o) for o in offsets], dtype=np.int64)
        else:
            dataset.offsets[split] = None
            counts = np.array([max(0, len(s) - block_size) for s in tokens], dtype=np.int64)
        if counts.sum() == 0:
            raise ValueError(f"the {split} split of {directory} has no shard longer than block_size={block_size} "
                             f"tokens: use a smaller block_size or more data")
        dataset.starts[split] = np.cumsum(counts)
    return dataset


def sample_windows(datasets, weights, split, count, rng_key):
    """count windows as (dataset index, shard index, offset), drawn from the mixture: a function of
    rng_key (a tuple of ints) alone."""
    rng = np.random.default_rng(rng_key)
    choice = rng.choice(len(datasets), size=count, p=weights) if len(datasets) > 1 else np.zeros(count, dtype=np.int64)
    windows = [None] * count
    for d, dataset in enumerate(datasets):
        picked = np.flatnonzero(choice == d)
        starts = dataset.starts[split]
        positions = rng.integers(0, starts[-1], size=len(picked))
        shard_ids = np.searchsorted(starts, positions, side="right")
        within = positions - np.concatenate(([0], starts))[shard_ids]
        for i, shard, k in zip(picked.tolist(), shard_ids.tolist(), within.tolist()):
            offsets = dataset.offsets[split]
            windows[i] = (d, shard, int(offsets[shard][k]) if offsets is not None else k)
    return windows


def read_windows(datasets, split, windows, block_size, use_loss_mask):
    """(inputs, targets) as int64 arrays of shape (len(windows), block_size) of windows (dataset,
    shard, offset[, first learned target]); targets that are not learned (outside a chat dataset's
    mask, when use_loss_mask; before the first learned one; a None window) are NOT_LEARNED."""
    tokens = np.zeros((len(windows), block_size + 1), dtype=np.int64)
    learned_mask = np.ones((len(windows), block_size), dtype=bool)
    for row, window in enumerate(windows):
        if window is None:  # padding (evaluation's equal shares per rank): nothing to learn
            learned_mask[row] = False
            continue
        d, shard, offset, *scored = window  # scored: targets before this index are another window's
        tokens[row] = datasets[d].tokens[split][shard][offset:offset + block_size + 1]
        if tokens[row].max() >= datasets[d].meta["vocab_size"]:  # a shard edited after prepare.py
            raise ValueError(f"{datasets[d].tokens[split][shard].filename} holds token id {tokens[row].max()} at "
                             f"offset {offset + int(tokens[row].argmax())}, outside the vocabulary of "
                             f"{datasets[d].meta['vocab_size']}: prepare the dataset again")
        masks = datasets[d].masks[split]
        if use_loss_mask and masks is not None:
            learned_mask[row] = masks[shard][offset + 1:offset + block_size + 1] > 0
        if scored:
            learned_mask[row, :scored[0]] = False
    targets = np.where(learned_mask, tokens[:, 1:], NOT_LEARNED)
    return tokens[:, :-1], targets


def learned_targets(datasets, split, windows, block_size):
    """How many targets of these windows read_windows(..., use_loss_mask=True) keeps: those a chat
    dataset's mask marks, every target of a text dataset. Reads only the masks."""
    count = 0
    for d, shard, offset in windows:
        masks = datasets[d].masks[split]
        count += (
            block_size if masks is None else int(np.count_nonzero(masks[shard][offset + 1 : offset + block_size + 1]))
        )
    return count


def open_mixture(mixture, block_size, align_to_documents=False, use_loss_mask=False):
    """(datasets, weights summing to 1, the tokenizer) of {dataset directory: weight}; a mixture's
    datasets must share one tokenizer, and with use_loss_mask each must have something to learn.
    Problems raise ValueError or FileNotFoundError."""
    import tokenizer as tok
    if not isinstance(mixture, dict) or not mixture or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and 0 < w < float("inf") for w in mixture.values()):
        raise ValueError(f"data_mixture must be a dict of dataset directory -> finite positive weight, got {mixture!r}")
    datasets = [open_dataset(directory, block_size, align_to_documents) for directory in mixture]
    encoders = [tok.load_tokenizer(d.directory) for d in datasets]
    for dataset, encoder in zip(datasets, encoders):
        if encoder.n_vocab != dataset.meta["vocab_size"]:
            raise ValueError(f"{dataset.directory}/meta.json says vocab_size {dataset.meta['vocab_size']}, but its "
                             f"tokenizer has {encoder.n_vocab} tokens: prepare the dataset again")
    for dataset, encoder in zip(datasets[1:], encoders[1:]):
        if not tok.same_ids(tok.tokenizer_state(encoder), tok.tokenizer_state(encoders[0])):
            raise ValueError(f"{dataset.directory} and {datasets[0].directory} use different tokenizers: a mixture "
                             f"needs one (prepare with --tokenizer=<the first dataset's directory>)")
    nothing = [d.directory for d in datasets if d.meta["splits"]["train"].get("learned_tokens") == 0]
    if use_loss_mask and nothing:  # (older datasets do not count them)
        raise ValueError(f"{nothing[0]}: its train split has no assistant message, so use_loss_mask leaves nothing "
                         f"to learn; prepare it from conversations with answers")
    return datasets, np.array(list(mixture.values()), dtype=np.float64) / sum(mixture.values()), encoders[0]


def micro_batches(datasets, weights, *, start_step, batch_size_at, micro_batch_size, rank, world_size, block_size,
                  use_loss_mask, seed, device):
    """(inputs, targets, loss scale) for each micro-batch of this rank, step after step from start_step,
    inputs and targets as tensors on device.
    The windows of step s are drawn from (seed, s) alone and split between ranks without overlap,
    so resuming at any step, or at another world size with the same global batch, sees the same data.
    The loss scale makes the step's loss the mean over every target the step learns, on all
    micro-batches and ranks (DDP and FSDP2 average gradients over ranks, hence the world_size)."""
    step = start_step
    while True:
        global_windows = sample_windows(datasets, weights, "train", batch_size_at(step), (seed, step))
        per_rank = len(global_windows) // world_size
        x, y = read_windows(
            datasets, "train", global_windows[rank * per_rank : (rank + 1) * per_rank], block_size, use_loss_mask
        )
        # the whole step's learned targets, counted on the host from the masks: no device sync
        n_learned = learned_targets(datasets, "train", global_windows, block_size) if use_loss_mask \
            else len(global_windows) * block_size
        for k in range(0, per_rank, micro_batch_size):
            yield to_device(x[k:k + micro_batch_size], device), to_device(y[k:k + micro_batch_size], device), \
                world_size / max(n_learned, 1)
        step += 1


def to_device(array, device):
    """A numpy array as a tensor on device (torch is imported here: prepare.py never needs it)."""
    import torch
    tensor = torch.from_numpy(array)
    if torch.device(device).type == "cuda":  # pinned memory lets the copy run asynchronously with the GPU's work
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    return tensor
