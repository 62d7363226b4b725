"""
Text -> tokenizer -> token shards.

    python prepare.py                                   # the offline demo corpus -> data/demo
    python prepare.py corpus/ --out=data/mine           # .txt / .jsonl / .parquet files, a directory or a glob
    python prepare.py HuggingFaceFW/fineweb-edu --hf_config=sample-10BT --max_docs=2000000 --out=data/fineweb
    python prepare.py chat.jsonl --tokenizer=data/demo  # reuse a saved tokenizer so ids never change

The demo corpus is built from what every CPython installation ships: the standard library's
.py sources and the documentation text in pydoc_data.topics (a few MB, no download).

Output directory:
    tokenizer.json, tokenizer.tiktoken     the tokenizer, as text (see tokenizer.py)
    train_000000.bin ..., val_000000.bin   token shards: a 32-byte header, then the tokens
    meta.json                              tokenizer, vocab size, special ids, counts, sources
Each document is preceded by <|endoftext|> (the BOS token). The train/val split is by document,
from a hash of its name, so it does not depend on order or on the number of workers. Everything is
written into OUT.tmp and renamed to OUT at the very end: an interrupted run never leaves a
dataset that looks complete.
"""
import argparse
import glob
import json
import multiprocessing
import os
import shutil
import struct
import sys
import sysconfig
import time
import zlib

import numpy as np

import tokenizer as tok

# ---------------------------------------------------------------------------------------------
# The shard format: header = magic (8 bytes), format version (u32), bytes per token (u32),
# token count (u64), reserved (u64); then the tokens, little-endian uint16 or uint32.
SHARD_MAGIC = b"GPTOKENS"
SHARD_VERSION = 1
SHARD_HEADER = struct.Struct("<8sIIQQ")  # 32 bytes
TOKEN_DTYPES = {2: np.uint16, 4: np.uint32}


def write_shard(path, tokens):
    tokens = np.asarray(tokens)
    with open(path, "wb") as f:
        f.write(SHARD_HEADER.pack(SHARD_MAGIC, SHARD_VERSION, tokens.dtype.itemsize, len(tokens), 0))
        f.write(tokens.astype(tokens.dtype.newbyteorder("<"), copy=False).tobytes())


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
    """Appends documents to {split}_NNNNNN.bin files, starting a new shard at a document boundary
    once the current one holds shard_tokens tokens."""

    def __init__(self, directory, split, dtype, shard_tokens):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, np.dtype(dtype), shard_tokens
        self.file, self.shards, self.count, self.total, self.documents = None, [], 0, 0, 0

    def add(self, tokens):
        if self.file is None or self.count >= self.shard_tokens:
            self.close()
            name = f"{self.split}_{len(self.shards):06d}.bin"
            self.shards.append(name)
            self.file = open(os.path.join(self.directory, name), "wb")
            self.file.write(SHARD_HEADER.pack(SHARD_MAGIC, SHARD_VERSION, self.dtype.itemsize, 0, 0))
            self.count = 0
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


# ---------------------------------------------------------------------------------------------
# Sources: each yields (document name, text). Names decide the train/val split.

def fail(message):
    sys.exit(f"prepare.py: error: {message}")


def demo_documents():
    stdlib = sysconfig.get_paths()["stdlib"]
    skip = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo",
            "pydoc_data", "encodings", "__pycache__"}
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in skip)
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path, encoding="utf-8", errors="replace") as f:
                    yield "stdlib/" + os.path.relpath(path, stdlib), f.read()
    from pydoc_data.topics import topics
    for name in sorted(topics):
        yield "pydoc/" + name, topics[name]


TEXT_CHUNK_CHARS = 8 << 20  # a .txt file larger than this is read (and split) in pieces ending at a newline


def text_file_documents(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        piece = 0
        while True:
            text = f.read(TEXT_CHUNK_CHARS)
            if not text:
                return
            text += f.readline()
            yield f"{path}#{piece}", text
            piece += 1


def jsonl_documents(path, field):
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"{path}:{line_number}: not valid JSON ({e.msg})")
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                fail(f"{path}:{line_number}: no string field '{field}' (choose the field with --text_field)")
            yield f"{path}:{line_number}", record[field]


def parquet_documents(path, field):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        fail(f"{path}: reading parquet needs pyarrow (pip install pyarrow)")
    parquet = pq.ParquetFile(path)
    if field not in parquet.schema_arrow.names:
        fail(f"{path}: no column '{field}' (columns: {', '.join(parquet.schema_arrow.names)}; use --text_field)")
    row = 0
    for batch in parquet.iter_batches(columns=[field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str):
                yield f"{path}:{row}", text
            row += 1


def hf_documents(name, args):
    try:
        import datasets
    except ImportError:
        fail(f"'{name}' is not a file, and Hugging Face datasets need the datasets package (pip install datasets)")
    stream = datasets.load_dataset(name, args.hf_config, split=args.hf_split, streaming=True)
    for row, record in enumerate(stream):
        yield f"{name}:{row}", record[args.text_field]


EXTENSIONS = (".txt", ".md", ".jsonl", ".parquet")


def expand_paths(source):
    """A file, a directory (searched recursively) or a glob -> sorted files; None if it is none of these."""
    if os.path.isdir(source):
        found = [os.path.join(root, name) for root, _, files in os.walk(source) for name in files]
        return sorted(p for p in found if p.endswith(EXTENSIONS))
    if os.path.isfile(source):
        return [source]
    if glob.has_magic(source):
        return sorted(p for p in glob.glob(source, recursive=True) if os.path.isfile(p))
    return None


def documents(args):
    if not args.sources:
        yield from demo_documents()
        return
    for source in args.sources:
        paths = expand_paths(source)
        if paths is None:
            if "/" in source and not source.startswith((".", "/")) and not os.path.exists(source.split("/")[0]):
                yield from hf_documents(source, args)
                continue
            fail(f"no such file, directory or glob: {source}")
        if not paths:
            fail(f"{source}: no {', '.join(EXTENSIONS)} files found")
        for path in paths:
            if not os.access(path, os.R_OK):
                fail(f"{path}: not readable")
            if path.endswith(".jsonl"):
                yield from jsonl_documents(path, args.text_field)
            elif path.endswith(".parquet"):
                yield from parquet_documents(path, args.text_field)
            else:
                yield from text_file_documents(path)


def split_of(name, val_fraction):
    return "val" if zlib.crc32(name.encode()) % 1_000_000 < val_fraction * 1_000_000 else "train"


def limited_documents(args):
    count = 0
    for name, text in documents(args):
        if not text.strip():
            continue
        yield name, text
        count += 1
        if args.max_docs and count >= args.max_docs:
            return


# ---------------------------------------------------------------------------------------------
# Tokenization in worker processes: each loads the tokenizer from the output's temporary directory.

_worker_encoder = None


def _init_worker(tokenizer_dir):
    global _worker_encoder
    _worker_encoder = tok.load_tokenizer(tokenizer_dir)


def _encode_batch(batch):
    bos = tok.bos_id(_worker_encoder)
    return [(split, len(text.encode("utf-8")), np.array([bos] + _worker_encoder.encode_ordinary(text), dtype=np.uint32))
            for split, text in batch]


def batches(args, docs_per_batch=64):
    batch = []
    for name, text in limited_documents(args):
        batch.append((split_of(name, args.val_fraction), text))
        if len(batch) == docs_per_batch:
            yield batch
            batch = []
    if batch:
        yield batch


class Progress:
    def __init__(self):
        self.start = self.last = time.time()
        self.documents = self.tokens = self.bytes = 0

    def update(self, tokens, nbytes, final=False):
        self.documents += not final
        self.tokens += tokens
        self.bytes += nbytes
        now = time.time()
        if final or (sys.stderr.isatty() and now - self.last > 0.5):
            self.last = now
            rate = self.bytes / max(now - self.start, 1e-9) / 1e6
            print(f"\r{self.documents:,} documents, {self.tokens:,} tokens, {self.bytes / 1e6:,.1f} MB "
                  f"({rate:.1f} MB/s)", end="\n" if final else "", file=sys.stderr, flush=True)


def build_tokenizer(args):
    if args.tokenizer == "bpe":
        chars = 0

        def training_texts():
            nonlocal chars
            for name, text in limited_documents(args):
                if split_of(name, args.val_fraction) == "train":
                    yield text
                    chars += len(text)
                    if chars >= args.tokenizer_train_chars:
                        return
        started = time.time()
        enc = tok.train_bpe(training_texts(), args.vocab_size)
        if chars == 0:
            fail("no text to train the tokenizer on: the sources are empty (or every document fell in the val split)")
        print(f"trained a BPE tokenizer of {enc.n_vocab} tokens in {time.time() - started:.1f}s", file=sys.stderr)
        return enc
    if args.tokenizer in tok.TIKTOKEN_NAMES:
        return tok.from_tiktoken_name(args.tokenizer)
    if args.tokenizer.startswith("hf:"):  # the tokenizer of a Hugging Face model directory
        from export_hf import tokenizer_from_hf
        return tokenizer_from_hf(args.tokenizer[3:])
    if os.path.isfile(os.path.join(args.tokenizer, "tokenizer.json")):
        return tok.load_tokenizer(args.tokenizer)
    fail(f"unknown --tokenizer={args.tokenizer}: use bpe, one of {', '.join(tok.TIKTOKEN_NAMES)}, "
         f"a directory holding a tokenizer.json, or hf:<model directory>")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="*", help="files, directories, globs or a Hugging Face dataset name (default: the demo corpus)")
    parser.add_argument("--out", default=None, help="output directory (default: data/demo, or data/<name of the first source>)")
    parser.add_argument("--tokenizer", default="bpe", help="bpe (train one here), gpt2, cl100k_base, o200k_base, a directory with a saved tokenizer, or hf:<Hugging Face model directory>")
    parser.add_argument("--vocab_size", type=int, default=4096, help="vocabulary of a trained BPE, special tokens included")
    parser.add_argument("--tokenizer_train_chars", type=int, default=2_000_000_000, help="train the BPE on at most this many characters")
    parser.add_argument("--val_fraction", type=float, default=None, help="fraction of documents held out for validation (default: 0.05 for the demo, else 0.005)")
    parser.add_argument("--text_field", default="text", help="the field (.jsonl) or column (.parquet, datasets) holding the text")
    parser.add_argument("--max_docs", type=int, default=0, help="stop after this many documents (0: all)")
    parser.add_argument("--shard_tokens", type=int, default=100_000_000, help="tokens per shard file")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    parser.add_argument("--hf_config", default=None, help="dataset configuration, for a Hugging Face dataset")
    parser.add_argument("--hf_split", default="train", help="dataset split, for a Hugging Face dataset")
    args = parser.parse_args(argv)
    if args.val_fraction is None:
        args.val_fraction = 0.005 if args.sources else 0.05
    if not 0 < args.val_fraction < 1:
        fail(f"--val_fraction={args.val_fraction} must be between 0 and 1")
    out = args.out or os.path.join("data", "demo" if not args.sources else
                                   os.path.splitext(os.path.basename(args.sources[0].rstrip("/")))[0] or "corpus")
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write_dataset(args, out, tmp)
    finally:  # on any failure, nothing but the old dataset (if any) is left
        shutil.rmtree(tmp, ignore_errors=True)


def write_dataset(args, out, tmp):
    enc = build_tokenizer(args)
    tok.save_tokenizer(enc, tmp)
    dtype = np.uint16 if enc.n_vocab <= 1 << 16 else np.uint32
    writers = {split: ShardWriter(tmp, split, dtype, args.shard_tokens) for split in ("train", "val")}
    byte_counts = {"train": 0, "val": 0}
    progress = Progress()
    pool = multiprocessing.Pool(args.workers, _init_worker, (tmp,)) if args.workers > 1 else None
    if pool is None:
        _init_worker(tmp)
    encoded = pool.imap(_encode_batch, batches(args)) if pool else map(_encode_batch, batches(args))
    try:
        for batch in encoded:  # imap keeps the input order, so the output is the same for any --workers
            for split, nbytes, tokens in batch:
                writers[split].add(tokens)
                byte_counts[split] += nbytes
                progress.update(len(tokens), nbytes)
    finally:
        if pool:
            pool.terminate()
    for writer in writers.values():
        writer.close()
    progress.update(0, 0, final=True)
    for split, writer in writers.items():
        if writer.documents == 0:
            fail(f"no documents in the {split} split ({progress.documents} in all): "
                 + ("the sources hold no text" if progress.documents == 0 else "use more documents or another --val_fraction"))

    meta = {
        "format_version": SHARD_VERSION,
        "tokenizer": enc.name,
        "vocab_size": enc.n_vocab,
        "bos_id": tok.bos_id(enc),
        "special_tokens": dict(enc._special_tokens),
        "token_dtype": np.dtype(dtype).name,
        "sources": args.sources or ["demo: CPython standard library sources + pydoc_data.topics"],
        "splits": {split: {"shards": w.shards, "tokens": w.total, "documents": w.documents, "bytes": byte_counts[split]}
                   for split, w in writers.items()},
    }
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    # swap in the finished dataset; an older one at the same path is removed only after that
    old = out.rstrip("/") + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(out):
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    print(f"wrote {out}: train {train['tokens']:,} tokens ({train['documents']:,} documents), "
          f"val {val['tokens']:,} tokens ({val['documents']:,} documents), vocab {enc.n_vocab}, "
          f"{train['bytes'] / max(train['tokens'], 1):.2f} bytes/token")


if __name__ == "__main__":
    main()
