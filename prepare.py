"""
Text -> tokenizer -> token shards.

    python prepare.py                                   # the offline demo: data/demo (text) and data/demo-chat
    python prepare.py corpus/ --out=data/mine           # .txt / .jsonl / .parquet files, a directory or a glob
    python prepare.py HuggingFaceFW/fineweb-edu --hf_config=sample-10BT --max_docs=2000000 --out=data/fineweb
    python prepare.py chat.jsonl --chat --tokenizer=data/demo  # conversations, with the pretrain tokenizer

The demo is built from what every CPython installation ships: the text corpus from the standard
library's .py sources and the documentation in pydoc_data.topics (a few MB, no download); the
chat set from question/answer pairs on the standard library's docstrings and pydoc topics.
With --chat, each .jsonl line is a conversation, {"messages": [{"role": "system"|"user"|"assistant",
"content": "..."}]}, rendered with tokenizer.encode_chat's template, with a loss mask per token
({split}_mask_NNNNNN.bin); a bad line (not JSON, no messages, an unknown role) is reported with
its file and line and skipped.

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
import sys
import sysconfig
import time
import zlib

import numpy as np

import tokenizer as tok
from data import SHARD_VERSION, ShardWriter, replace_directory

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


class BadConversations:
    """Conversations that are skipped: reported with file and line, the first few in full."""
    count = 0

    @classmethod
    def report(cls, where, reason):
        cls.count += 1
        if cls.count <= 20:
            print(f"skipping {where}: {reason}", file=sys.stderr)


def chat_documents(path):
    """{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]} per line. A bad line
    is skipped and reported rather than failing a whole dataset for it."""
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                BadConversations.report(where, f"not valid JSON ({e.msg})")
                continue
            messages = record.get("messages") if isinstance(record, dict) else None
            problem = conversation_problem(messages)
            if problem:
                BadConversations.report(where, problem)
                continue
            yield where, messages


def conversation_problem(messages):
    """What is wrong with a conversation's messages, or None when nothing is."""
    if not isinstance(messages, list) or not messages:
        return "no non-empty 'messages' list"
    problem = next((m for m in messages if not isinstance(m, dict) or m.get("role") not in tok.CHAT_ROLES
                    or not isinstance(m.get("content"), str)), None)
    if problem is not None:
        return f"a message is not {{'role': {'|'.join(tok.CHAT_ROLES)}, 'content': str}}: {str(problem)[:80]}"
    return None


DEMO_QUESTIONS = ["What does {name} do?", "What is {name} for?", "Explain {name} briefly.",
                  "Describe {name} in one sentence.", "Summarize what {name} does."]
DEMO_SYSTEM = "You answer questions about the Python standard library in one or two sentences."


def demo_conversations():
    """Question/answer pairs from what CPython ships: each public function's and class's docstring
    summary in the standard library ("What does json.dumps do?" -> its first paragraph), and the
    opening paragraph of each pydoc topic."""
    import ast
    import inspect

    def first_paragraph(text):
        paragraph = inspect.cleandoc(text).split("\n\n")[0]
        return " ".join(paragraph.split())

    def conversation(name, question, answer):
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if zlib.crc32(name.encode()) % 4 == 0:  # some with a system prompt
            messages.insert(0, {"role": "system", "content": DEMO_SYSTEM})
        return name, messages

    for name, source in demo_documents():
        if not name.startswith("stdlib/") or "/_" in name or name.split("/")[-1].startswith("_"):
            continue
        module = name[len("stdlib/"):-len(".py")].replace("/", ".").removesuffix(".__init__")
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        # public functions and classes, and the public methods of public classes
        nodes = [(node.name, node) for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
        nodes += [(f"{cls.name}.{node.name}", node) for _, cls in list(nodes) if isinstance(cls, ast.ClassDef)
                  and not cls.name.startswith("_") for node in cls.body if isinstance(node, ast.FunctionDef)]
        for path, node in nodes:
            if not any(part.startswith("_") for part in path.split(".")):
                docstring = ast.get_docstring(node)
                answer = first_paragraph(docstring) if docstring else ""
                if 20 <= len(answer) <= 400:
                    qualified = f"{module}.{path}"
                    question = DEMO_QUESTIONS[zlib.crc32(qualified.encode()) % len(DEMO_QUESTIONS)]
                    yield conversation(f"docstring:{qualified}", question.format(name=qualified), answer)
    from pydoc_data.topics import topics
    for topic in sorted(topics):
        lines = topics[topic].strip().split("\n")
        answer = first_paragraph("\n".join(lines[2:])) if len(lines) > 2 and set(lines[1]) <= {"*", "="} else ""
        if 20 <= len(answer) <= 600:
            yield conversation(f"pydoc:{topic}", f"What does the Python documentation say about {topic}?", answer)


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
        if args.chat:  # conversations in a "messages" column, checked like a .jsonl line
            messages = record.get("messages")
            problem = conversation_problem(messages)
            if problem:
                BadConversations.report(f"{name}:{row}", problem)
            else:
                yield f"{name}:{row}", [{"role": m["role"], "content": m["content"]} for m in messages]
        else:
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
        yield from demo_conversations() if args.chat else demo_documents()
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
            if args.chat:
                if not path.endswith(".jsonl"):
                    fail(f"{path}: --chat takes .jsonl files of {{\"messages\": [...]}} records")
                yield from chat_documents(path)
            elif path.endswith(".jsonl"):
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
        if isinstance(text, str) and not text.strip():
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
    """[(split, bytes, tokens, loss mask or None)] for [(split, text or conversation)]."""
    bos = tok.bos_id(_worker_encoder)
    encoded = []
    for split, content in batch:
        if isinstance(content, str):
            tokens, mask = [bos] + _worker_encoder.encode_ordinary(content), None
            nbytes = len(content.encode("utf-8"))
        else:
            tokens, mask = tok.encode_chat(_worker_encoder, content)
            nbytes = sum(len(m["content"].encode("utf-8")) for m in content)
        encoded.append((split, nbytes, np.array(tokens, dtype=np.uint32), None if mask is None else np.array(mask, dtype=np.uint8)))
    return encoded


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
    parser.add_argument("--chat", action="store_true", help="the .jsonl sources are conversations: {\"messages\": [{\"role\", \"content\"}, ...]}")
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
    if args.sources or args.chat:
        build(args, out)
    else:  # the demo: the text corpus, then its chat set (OUT-chat) with the same tokenizer
        build(args, out)
        build(argparse.Namespace(**{**vars(args), "chat": True, "tokenizer": out}), out.rstrip("/") + "-chat")


def build(args, out):
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
    # chat datasets: a parallel file of loss masks, one byte per token, with the same shard boundaries
    mask_writers = {split: ShardWriter(tmp, f"{split}_mask", np.uint8, args.shard_tokens) for split in ("train", "val")}
    byte_counts = {"train": 0, "val": 0}
    progress = Progress()
    pool = multiprocessing.Pool(args.workers, _init_worker, (tmp,)) if args.workers > 1 else None
    if pool is None:
        _init_worker(tmp)
    encoded = pool.imap(_encode_batch, batches(args)) if pool else map(_encode_batch, batches(args))
    try:
        for batch in encoded:  # imap keeps the input order, so the output is the same for any --workers
            for split, nbytes, tokens, mask in batch:
                writers[split].add(tokens)
                if mask is not None:
                    mask_writers[split].add(mask)
                byte_counts[split] += nbytes
                progress.update(len(tokens), nbytes)
    finally:
        if pool:
            pool.terminate()
    for writer in [*writers.values(), *mask_writers.values()]:
        writer.close()
    progress.update(0, 0, final=True)
    for split, writer in writers.items():
        if writer.documents == 0:
            fail(f"no documents in the {split} split ({progress.documents} in all): "
                 + ("the sources hold no text" if progress.documents == 0 else "use more documents or another --val_fraction"))

    if BadConversations.count:
        print(f"skipped {BadConversations.count} bad conversations", file=sys.stderr)
    meta = {
        "format_version": SHARD_VERSION,
        "chat": bool(args.chat),
        "tokenizer": enc.name,
        "vocab_size": enc.n_vocab,
        "bos_id": tok.bos_id(enc),
        "special_tokens": dict(enc._special_tokens),
        "token_dtype": np.dtype(dtype).name,
        "sources": args.sources or ["demo: CPython standard library " + ("docstring and pydoc topic Q&A" if args.chat else
                                                                          "sources + pydoc_data.topics")],
        "splits": {split: {"shards": w.shards, "masks": mask_writers[split].shards, "tokens": w.total,
                           "documents": w.documents, "bytes": byte_counts[split]} for split, w in writers.items()},
        "skipped_conversations": BadConversations.count,
    }
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    replace_directory(tmp, out)
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    print(f"wrote {out}: train {train['tokens']:,} tokens ({train['documents']:,} documents), "
          f"val {val['tokens']:,} tokens ({val['documents']:,} documents), vocab {enc.n_vocab}, "
          f"{train['bytes'] / max(train['tokens'], 1):.2f} bytes/token")


if __name__ == "__main__":
    main()
