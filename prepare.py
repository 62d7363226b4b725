"""
Text -> tokenizer -> token shards.

    python prepare.py                                   # the offline demo: data/demo (text) and data/demo-chat
    python prepare.py corpus/ --out=data/mine           # .txt / .md / .jsonl / .parquet files, a directory or a glob
    python prepare.py HuggingFaceFW/fineweb-edu --hf_config=sample-10BT --max_docs=2000000 --out=data/fineweb
    python prepare.py chat.jsonl --chat=True --tokenizer=data/demo  # conversations, with the pretrain tokenizer

With no sources it builds the offline demo (demo.py): the text corpus from the standard library,
the chat set of questions on it, and three evaluation tasks (OUT-tasks) on its held-out modules.
With --chat=True, each .jsonl line is a conversation, {"messages": [{"role": "system"|"user"|
"assistant", "content": "..."}]} (OpenAI's format) or {"conversations": [{"from": "system"|"human"|
"gpt", "value": "..."}]} (ShareGPT's), rendered with tokenizer.encode_chat's template, with a loss mask
per token ({split}_mask_NNNNNN.bin); a bad line (not JSON, no messages, an unknown role) is
reported with its file and line and skipped. Files that are not UTF-8 text are skipped and
counted; characters JSON can carry but UTF-8 cannot (lone surrogates) become U+FFFD, counted.

Output directory:
    tokenizer.json, tokenizer.tiktoken     the tokenizer, as text (see tokenizer.py)
    train_000000.bin ..., val_000000.bin   token shards: a 32-byte header, then the tokens
    meta.json                              tokenizer, vocab size, special ids, counts, sources
Each document is preceded by <|endoftext|> (the BOS token). A .txt/.md file is one document, or,
when larger than text_document_chars, several, cut at blank lines (a book, a concatenated corpus).
The train/val split is by document, from a hash of its name (data.split_of), so it does not depend
on order or on the number of workers; it is checked before anything is tokenized. Everything is written into
OUT.tmp and renamed to OUT at the very end: an interrupted run never leaves a dataset that looks
complete.
"""
import glob
import json
import multiprocessing
import os
import shutil
import sys
import time

import numpy as np

# ----------------------------------------------------------------------------------------------
sources = []                    # files, directories, globs or a Hugging Face dataset name, also given as plain
                                # arguments; none: the offline demo corpus and its chat set
out = ""                        # output directory; '': data/demo, or data/<name of the first source>
tokenizer = "bpe"               # bpe (train one here), gpt2, cl100k_base, o200k_base, bytes (256 byte tokens: no
                                # training, no download), a directory holding a tokenizer.json (an earlier
                                # dataset's: ids never change between stages), hf:<model dir>
chat = False                    # the .jsonl sources are conversations (OpenAI "messages" or ShareGPT "conversations")
vocab_size = 4096               # vocabulary of a trained BPE, special tokens included
tokenizer_train_chars = 2_000_000_000  # train the BPE on at most this many characters
val_fraction = 0.0              # fraction of documents held out for validation; 0: 0.05 for the demo, else 0.005
text_field = "text"             # the field (.jsonl) or column (.parquet, datasets) holding the text
text_document_chars = 10_000    # a longer .txt/.md file is cut, at blank lines, into documents of about this size
max_docs = 0                    # stop after this many documents (0: all)
shard_tokens = 100_000_000      # tokens per shard file
workers = 0                     # tokenizer processes; 0: one per CPU core
hf_config = None                # dataset configuration, for a Hugging Face dataset
hf_split = "train"              # dataset split, for a Hugging Face dataset
progress_seconds = 30.0         # a progress line this often in a log file (twice a second on a terminal)
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
# ----------------------------------------------------------------------------------------------

from data import ShardWriter, split_of, val_split_advice, write_meta  # noqa: E402
from demo import TASK_FILES, demo_conversations, demo_documents, write_demo_tasks  # noqa: E402
from infra.rundir import check_replaceable, claim_output, replace_directory  # noqa: E402
import tokenizer as tok  # noqa: E402  (after the config: `tokenizer` is also a setting's name)

DATASET_FILES = ("meta.json", "tokenizer.json", "tokenizer.tiktoken", "train_*.bin", "val_*.bin")  # what build writes
MIN_VAL_TOKENS = 10_000  # fewer, and a validation loss says little: prepare.py warns


def fail(message):
    sys.exit(f"prepare.py: error: {message}")


# ---------------------------------------------------------------------------------------------
# Sources: each yields (document name, text or conversation, problem). Names decide the split; a
# document with a problem (a string saying what is wrong) is skipped and counted, never tokenized.

def text_file_documents(path):
    """A text file as one document, or cut at blank lines into documents of about
    text_document_chars; a file that is not UTF-8 text is skipped."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        yield path, None, f"not UTF-8 text ({e.reason} at byte {e.start}): skipped"
        return
    if "\0" in text:
        yield path, None, "not text (NUL bytes): skipped"
        return
    if len(text) <= text_document_chars:
        yield path, text, None
        return
    piece, start = 0, 0
    while start < len(text):
        end = start + text_document_chars
        if end < len(text):  # end after a blank line in the second half of the piece, else a newline, else anywhere
            blank_line = text.rfind("\n\n", start + text_document_chars // 2, end - 1)
            newline = text.rfind("\n", start + text_document_chars // 2, end)
            end = blank_line + 2 if blank_line >= 0 else newline + 1 if newline >= 0 else end
        yield f"{path}#{piece}", text[start:end], None
        piece, start = piece + 1, end


def utf8_clean(text):
    """Text that UTF-8 can encode: lone surrogates (valid in JSON, not in UTF-8) become U+FFFD."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def jsonl_documents(path, field):
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"{path}:{line_number}: not valid JSON ({e.msg})")
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                fail(f"{path}:{line_number}: no string field '{field}' (choose the field with --text_field)")
            yield f"{path}:{line_number}", record[field], None


def chat_documents(path):
    """One conversation per line, in either format tokenizer.chat_messages reads. A bad line is skipped and
    reported rather than failing a whole dataset for it; a file with no conversation at all is refused."""
    found = False
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, None, f"not valid JSON ({e.msg})"
                continue
            messages, problem = tok.chat_messages(record)
            found |= problem is None
            yield where, messages, problem
    if not found:
        fail(f"{path}: no line is a conversation; --chat=True takes one per line, {tok.CHAT_FORMATS}")


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
                yield f"{path}:{row}", text, None
            row += 1


def hf_documents(name):
    try:
        import datasets
    except ImportError:
        fail(f"'{name}' is not a file, and Hugging Face datasets need the datasets package (pip install datasets)")
    stream = datasets.load_dataset(name, hf_config, split=hf_split, streaming=True)
    for row, record in enumerate(stream):
        if chat:  # conversations in a "messages" or "conversations" column, checked like a .jsonl line
            yield f"{name}:{row}", *tok.chat_messages(record)
        else:
            yield f"{name}:{row}", record[text_field], None


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


def source_documents():
    if not sources:
        yield from demo_conversations(val_fraction) if chat else demo_documents()
        return
    for source in sources:
        paths = expand_paths(source)
        if paths is None:
            if "/" in source and not source.startswith((".", "/")) and not os.path.exists(source.split("/")[0]):
                yield from hf_documents(source)
                continue
            fail(f"no such file, directory or glob: {source}")
        if not paths:
            fail(f"{source}: no {', '.join(EXTENSIONS)} files found")
        for path in paths:
            if not os.access(path, os.R_OK):
                fail(f"{path}: not readable")
            if chat:
                if not path.endswith(".jsonl"):
                    fail(f"{path}: --chat=True takes .jsonl files of conversations, {tok.CHAT_FORMATS}")
                yield from chat_documents(path)
            elif path.endswith(".jsonl"):
                yield from jsonl_documents(path, text_field)
            elif path.endswith(".parquet"):
                yield from parquet_documents(path, text_field)
            else:
                yield from text_file_documents(path)


def documents():
    """(name, split, text or conversation, problem) of every document to write (empty texts left out),
    up to max_docs."""
    count = 0
    for name, content, problem in source_documents():
        if isinstance(content, str) and not content.strip():
            continue
        yield name, split_of(name, val_fraction), content, problem
        count += problem is None
        if max_docs and count >= max_docs:
            return


def check_splits():
    """Fail, before tokenizing anything, when a split would get no documents: reads documents only
    until both splits have one."""
    counts = {"train": 0, "val": 0}
    for _, split, _, problem in documents():
        counts[split] += problem is None
        if counts["train"] and counts["val"]:
            return
    refuse_an_empty_split(counts)


def refuse_an_empty_split(counts):
    """Fail when a split ({split: documents}) has no documents: training needs both."""
    total = sum(counts.values())
    for split in ("train", "val"):
        if counts[split] == 0:
            fail(f"no documents in the {split} split ({total} in all): "
                 + ("the sources hold no text" if total == 0 else "use more documents or another --val_fraction"))


# ---------------------------------------------------------------------------------------------
# Tokenization in worker processes: each loads the tokenizer from the output's temporary directory.

_worker_encoder = None


def _init_worker(tokenizer_dir):
    global _worker_encoder
    _worker_encoder = tok.load_tokenizer(tokenizer_dir)


def _encode(content):
    """(bytes, tokens, loss mask or None) of a text or a conversation."""
    if isinstance(content, str):
        ids = [tok.bos_id(_worker_encoder)] + _worker_encoder.encode_ordinary(content)
        return len(content.encode("utf-8")), ids, None
    ids, mask = tok.encode_chat(_worker_encoder, content)
    return sum(len(m["content"].encode("utf-8")) for m in content), ids, mask


def _encode_batch(batch):
    """[(split, bytes, tokens, loss mask or None, cleaned)] for [(split, text or conversation)]; cleaned:
    lone surrogates had to be replaced (rare, so looked for only when encoding fails)."""
    encoded = []
    for split, content in batch:
        try:
            (nbytes, tokens, mask), cleaned = _encode(content), False
        except UnicodeEncodeError:
            content = utf8_clean(content) if isinstance(content, str) else \
                [{**m, "content": utf8_clean(m["content"])} for m in content]
            (nbytes, tokens, mask), cleaned = _encode(content), True
        encoded.append((split, nbytes, np.array(tokens, dtype=np.uint32),
                        None if mask is None else np.array(mask, dtype=np.uint8), cleaned))
    return encoded


class Progress:
    """A progress line on stderr: rewritten in place twice a second on a terminal, a new line every
    progress_seconds in a log file (so a redirected or SLURM log shows signs of life too)."""

    def __init__(self, what):
        self.what, self.start, self.last, self.tty = what, time.time(), time.time(), sys.stderr.isatty()
        self.documents = self.tokens = self.bytes = self.skipped = 0

    def update(self, documents=0, tokens=0, nbytes=0, final=False):
        self.documents, self.tokens, self.bytes = self.documents + documents, self.tokens + tokens, self.bytes + nbytes
        now = time.time()
        if final or now - self.last > (0.5 if self.tty else progress_seconds):
            self.last = now
            rate = self.bytes / max(now - self.start, 1e-9) / 1e6
            tokens = f"{self.tokens:,} tokens, " if self.tokens else ""
            line = (f"{self.what}: {self.documents:,} documents, {tokens}{self.bytes / 1e6:,.1f} MB in "
                    f"{now - self.start:,.0f}s ({rate:.1f} MB/s)")
            print(("\r" if self.tty else "") + line, end="\n" if final or not self.tty else "", file=sys.stderr,
                  flush=True)


def build_tokenizer(spec):
    if spec == "bpe":
        progress = Progress("reading the tokenizer's training text")

        def training_texts():
            for _, split, text, problem in documents():
                if split == "train" and problem is None:
                    if chat:  # a conversation: the text of its messages as encode_chat renders them
                        text = "\n".join(f"{m['role']}\n{m['content']}" for m in text)
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError:
                        text = utf8_clean(text)
                    yield text
                    progress.update(1, nbytes=len(text))
                    if progress.bytes >= tokenizer_train_chars:
                        return
        print(f"training a BPE tokenizer of {vocab_size} tokens (rustbpe) on up to {tokenizer_train_chars:,} "
              f"characters of the train split", file=sys.stderr, flush=True)
        enc = tok.train_bpe(training_texts(), vocab_size)
        if progress.documents == 0:
            fail("no text to train the tokenizer on: the sources are empty (or every document fell in the val split)")
        print(f"trained a BPE tokenizer of {enc.n_vocab} tokens on {progress.bytes / 1e6:,.1f} MB in "
              f"{time.time() - progress.start:.1f}s", file=sys.stderr, flush=True)
        return enc
    try:
        return tok.named_tokenizer(spec)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))


def build(out):
    try:
        tmp = claim_output(out, tool="prepare.py", option="out")
    except ValueError as e:
        fail(str(e))
    try:
        write_dataset(out, tmp)
    except OSError as e:  # a full disk, a file too large: one line, and the old dataset (if any) as it was
        free = shutil.disk_usage(tmp).free / 2**20 if os.path.isdir(tmp) else 0
        fail(f"cannot write {out}: {e.strerror or e} ({free:,.0f} MiB free): free some space or choose another --out")
    finally:  # on any failure, nothing but the old dataset (if any) is left
        shutil.rmtree(tmp, ignore_errors=True)


def write_dataset(out, tmp):
    check_splits()
    enc = build_tokenizer(tokenizer)
    tok.save_tokenizer(enc, tmp)
    dtype = np.uint16 if enc.n_vocab <= 1 << 16 else np.uint32
    writers = {split: ShardWriter(tmp, split, dtype, shard_tokens) for split in ("train", "val")}
    # chat datasets: a parallel file of loss masks, one byte per token, with the same shard boundaries
    mask_writers = {split: ShardWriter(tmp, f"{split}_mask", np.uint8, shard_tokens) for split in ("train", "val")}
    byte_counts = {"train": 0, "val": 0}
    skipped, replaced = [], 0  # (document, why) not written; documents whose lone surrogates became U+FFFD
    progress = Progress("tokenizing")

    def batches(docs_per_batch=64):
        batch = []
        for name, split, content, problem in documents():
            if problem is not None:
                skipped.append((name, problem))
                if len(skipped) <= 20:
                    print(f"skipping {name}: {problem}", file=sys.stderr, flush=True)
                continue
            batch.append((split, content))
            if len(batch) == docs_per_batch:
                yield batch
                batch = []
        if batch:
            yield batch

    n_workers = workers or os.cpu_count() or 1
    pool = multiprocessing.Pool(n_workers, _init_worker, (tmp,)) if n_workers > 1 else None
    if pool is None:
        _init_worker(tmp)
    encoded = pool.imap(_encode_batch, batches()) if pool else map(_encode_batch, batches())
    learned = {"train": 0, "val": 0}  # the targets a finetune learns (the loss masks' ones)
    try:
        for batch in encoded:  # imap keeps the input order, so the output is the same for any number of workers
            for split, nbytes, tokens, mask, cleaned in batch:
                replaced += cleaned
                writers[split].add(tokens)
                if mask is not None:
                    mask_writers[split].add(mask)
                    learned[split] += int(mask.sum())
                byte_counts[split] += nbytes
                progress.update(1, len(tokens), nbytes)
    finally:
        if pool:
            pool.terminate()
    for writer in [*writers.values(), *mask_writers.values()]:
        writer.close()
    progress.update(final=True)
    if skipped:
        print(f"skipped {len(skipped)} documents (the first {min(len(skipped), 20)} named above)", file=sys.stderr)
    if replaced:
        print(f"replaced lone surrogates (valid in JSON, not in UTF-8) with U+FFFD in {replaced} documents",
              file=sys.stderr)
    refuse_an_empty_split({split: writer.documents for split, writer in writers.items()})
    for split, count in learned.items() if chat else ():  # a finetune would show a loss of 0 and learn nothing
        if count == 0:
            fail(f"the {split} split's {writers[split].documents} conversations have no assistant message: nothing "
                 f"to learn (finetuning learns the assistant's words); add conversations with answers")

    meta = {
        "chat": bool(chat),
        "tokenizer": enc.name,
        "vocab_size": enc.n_vocab,
        "bos_id": tok.bos_id(enc),
        "special_tokens": dict(enc._special_tokens),
        "token_dtype": np.dtype(dtype).name,
        "sources": sources or ["demo: CPython standard library " + ("docstring and pydoc topic Q&A" if chat else
                                                                     "sources + pydoc_data.topics")],
        "splits": {split: {"shards": w.shards, "masks": mask_writers[split].shards, "tokens": w.total,
                           "documents": w.documents, "bytes": byte_counts[split], "max_token_ids": w.max_ids,
                           **({"learned_tokens": learned[split]} if chat else {})}
                   for split, w in writers.items()},
        "skipped_documents": len(skipped),
        "documents_with_replaced_characters": replaced,
    }
    write_meta(tmp, meta)
    replace_directory(tmp, out)
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    if val["tokens"] < MIN_VAL_TOKENS:
        print(f"warning: the val split of {out} holds only {val['tokens']:,} tokens ({val['documents']} documents): a "
              f"validation loss on so few is noise (now --val_fraction={val_fraction}); for {MIN_VAL_TOKENS:,}, "
              f"{val_split_advice(MIN_VAL_TOKENS, train['tokens'] + val['tokens'])}", file=sys.stderr)
    print(f"wrote {out}: train {train['tokens']:,} tokens ({train['documents']:,} documents), "
          f"val {val['tokens']:,} tokens ({val['documents']:,} documents), vocab {enc.n_vocab}, "
          f"{train['bytes'] / max(train['tokens'], 1):.2f} bytes/token")


if __name__ == "__main__":
    val_fraction = val_fraction or (0.005 if sources else 0.05)
    if not 0 < val_fraction < 1:
        fail(f"--val_fraction={val_fraction} must be between 0 and 1")
    if tokenizer == "bpe" and vocab_size < 256 + len(tok.SPECIAL_TOKENS):
        fail(f"--vocab_size={vocab_size} is too small for a BPE: it needs 256 byte tokens + "
             f"{len(tok.SPECIAL_TOKENS)} specials at least")
    out = out or os.path.join("data", "demo" if not sources else
                              os.path.splitext(os.path.basename(sources[0].rstrip("/")))[0] or "corpus")
    demo = not sources and not chat
    try:  # refused before any work: only a dataset (or the demo's tasks) is ever replaced
        check_replaceable(out, DATASET_FILES, "a dataset prepare.py wrote")
        if demo:
            check_replaceable(out.rstrip("/") + "-chat", DATASET_FILES, "a dataset prepare.py wrote")
            check_replaceable(out.rstrip("/") + "-tasks", TASK_FILES, "the demo tasks prepare.py wrote")
    except ValueError as e:
        fail(str(e))
    build(out)
    if demo:  # the demo: the text corpus, its chat set (OUT-chat) with the same tokenizer, its tasks
        chat, tokenizer = True, out
        build(out.rstrip("/") + "-chat")
        write_demo_tasks(out.rstrip("/") + "-tasks", val_fraction)
