"""
Tokenizers: a byte-level BPE trained here with rustbpe, a tiktoken encoding by name, or the
byte-level BPE of a Hugging Face model directory, always used as a tiktoken.Encoding and always
saved as text, never pickled:

    tokenizer.tiktoken   tiktoken's rank file: one "base64(token bytes) rank" per line
    tokenizer.json       name, split pattern and special tokens

Every tokenizer carries the same special tokens, so a later stage (midtrain, chat finetune)
reuses the pretrain tokenizer and no id ever changes:
    <|endoftext|>                 begins every document (BOS) and separates documents
    <|im_start|>, <|im_end|>      the chat template (ChatML): <|im_start|>role\\ncontent<|im_end|>\\n
    <|reserved_0..4|>             kept free for later formats (tool calls, ...)

Also here: the chat template, and the reading of a chat record in OpenAI's or ShareGPT's form.
"""
import base64
import json
import os

import numpy as np
import tiktoken

from data import read_json

BOS = "<|endoftext|>"
SPECIAL_TOKENS = [BOS, "<|im_start|>", "<|im_end|>"] + [f"<|reserved_{i}|>" for i in range(5)]

# GPT-4's split pattern, but numbers split into groups of 1-2 digits instead of 1-3: with a small
# vocabulary, merges are better spent on text than on every 3-digit number.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

# tiktoken's published encodings usable by name. "gpt2" is the same BPE as r50k_base; r50k_base is
# read from a single rank file (cached by tiktoken under TIKTOKEN_CACHE_DIR once downloaded).
TIKTOKEN_NAMES = {"gpt2": "r50k_base", "r50k_base": "r50k_base", "cl100k_base": "cl100k_base",
                  "o200k_base": "o200k_base"}


def train_bpe(texts, vocab_size):
    """Train a byte-level BPE of vocab_size tokens in all (specials included) on an iterator of strings."""
    import rustbpe  # only needed to train
    n_merged = vocab_size - len(SPECIAL_TOKENS)
    if n_merged < 256:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: it needs 256 byte tokens + {len(SPECIAL_TOKENS)} specials at least"
        )
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(texts, n_merged, pattern=SPLIT_PATTERN)
    ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
    specials = {token: len(ranks) + i for i, token in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name=f"bpe{vocab_size}", pat_str=bpe.get_pattern(), mergeable_ranks=ranks,
                             special_tokens=specials)


def byte_tokenizer():
    """The 256 bytes as tokens, and the special tokens: no training, no download (for checks and tests)."""
    return tiktoken.Encoding(name="bytes", pat_str=SPLIT_PATTERN, mergeable_ranks={bytes([b]): b for b in range(256)},
                             special_tokens={token: 256 + i for i, token in enumerate(SPECIAL_TOKENS)})


def from_tiktoken_name(name):
    """A published tiktoken encoding, with this repo's special tokens appended after its own ids."""
    base = tiktoken.get_encoding(TIKTOKEN_NAMES[name])
    specials = dict(base._special_tokens)
    next_id = base.n_vocab
    for token in SPECIAL_TOKENS:
        if token not in specials:
            specials[token] = next_id
            next_id += 1
    return tiktoken.Encoding(name=name, pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks,
                             special_tokens=specials)


def tokenizer_state(enc):
    """Everything that defines the tokenizer, as plain strings and ints (what checkpoints embed)."""
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in
             sorted(enc._mergeable_ranks.items(), key=lambda item: item[1])]
    return {"name": enc.name, "pattern": enc._pat_str, "special_tokens": dict(enc._special_tokens),
            "ranks": "\n".join(lines) + "\n"}


def same_ids(state_a, state_b):
    """Whether two tokenizer states give every text the same ids: the same split pattern, merges and
    special tokens (the name may differ)."""
    return all(state_a[k] == state_b[k] for k in ("pattern", "special_tokens", "ranks"))


def tokenizer_label(state):
    """A tokenizer state in a few words: its name, size and a fingerprint of its merges (two tokenizers
    of one size differ there)."""
    import hashlib
    size = state["ranks"].count("\n") + len(state["special_tokens"])
    return f"{state['name']!r}, {size:,} tokens, merges {hashlib.sha1(state['ranks'].encode()).hexdigest()[:8]}"


def check_tokenizer_state(state, where):
    """A tokenizer state (tokenizer_state's dict) checked for its keys and types: ValueError naming where."""
    if not isinstance(state, dict):
        raise ValueError(
            f"{where} must be a tokenizer (a dict of name, pattern, special_tokens, ranks), got {type(state).__name__}"
        )
    for key, kind in [("name", str), ("pattern", str), ("special_tokens", dict), ("ranks", str)]:
        if not isinstance(state.get(key), kind):
            raise ValueError(f"{where}: {key!r} must be a {kind.__name__}, got {state.get(key)!r:.60}")
    if not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
        for k, v in state["special_tokens"].items()
    ):
        raise ValueError(f"{where}: special_tokens must map strings to integer ids")


def tokenizer_from_state(state):
    ranks = {}
    for line in state["ranks"].splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(name=state["name"], pat_str=state["pattern"], mergeable_ranks=ranks,
                             special_tokens={k: int(v) for k, v in state["special_tokens"].items()})


def save_tokenizer(enc, directory):
    state = tokenizer_state(enc)
    with open(os.path.join(directory, "tokenizer.tiktoken"), "w") as f:
        f.write(state.pop("ranks"))
    with open(os.path.join(directory, "tokenizer.json"), "w") as f:
        json.dump({**state, "ranks_file": "tokenizer.tiktoken"}, f, indent=1)


def load_tokenizer(directory):
    """The tokenizer saved in a dataset (or export) directory."""
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no tokenizer.json in {directory}: prepare the data with prepare.py first")
    state = read_json(path, fix="write it again (prepare.py, or export_hf.py for an export)")
    if "ranks_file" not in state:
        raise ValueError(f"{path} is not a tokenizer saved by this repo (a Hugging Face model's? use hf:{directory})")
    with open(os.path.join(directory, state.pop("ranks_file"))) as f:
        state["ranks"] = f.read()
    return tokenizer_from_state(state)


def bos_id(enc):
    return enc._special_tokens[BOS]


def missing_special_tokens(special_tokens):
    """The special tokens this repo's stages need (document start, chat template) that are not there."""
    return [t for t in SPECIAL_TOKENS[:3] if t not in special_tokens]


def bytes_to_unicode():
    """GPT-2's reversible map from bytes to printable characters, used by byte-level BPE vocabularies."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def tokenizer_from_hf(directory):
    """The byte-level BPE of a Hugging Face model directory's tokenizer.json (a regex split, no
    normalizer), with this repo's special tokens."""
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no tokenizer.json in {directory}")
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is corrupt ({type(e).__name__}: {e}): copy the model's tokenizer.json "
                         "again") from None
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    split = [s for s in steps if s.get("type") == "Split"]
    if model.get("type") != "BPE" or spec.get("normalizer") or len(split) != 1 or "Regex" not in split[0]["pattern"] \
            or not any(s.get("type") == "ByteLevel" for s in steps):
        raise ValueError(f"{directory}: only byte-level BPE tokenizers with a regex split are supported")
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {bytes(to_byte[c] for c in token): rank for token, rank in model["vocab"].items()}
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    if missing_special_tokens(specials):
        raise ValueError(f"{directory}: the tokenizer lacks the special tokens {missing_special_tokens(specials)} "
                         f"that this repo's stages use")
    return tiktoken.Encoding(name=os.path.basename(directory.rstrip("/")), pat_str=split[0]["pattern"]["Regex"],
                             mergeable_ranks=ranks, special_tokens=specials)


def named_tokenizer(spec):
    """The tokenizer a name gives: a tiktoken encoding, "bytes", "hf:<model directory>" or a directory
    holding a tokenizer.json. Raises ValueError (or FileNotFoundError) saying what is accepted."""
    if spec in TIKTOKEN_NAMES:
        return from_tiktoken_name(spec)
    if spec == "bytes":
        return byte_tokenizer()
    if spec.startswith("hf:"):
        return tokenizer_from_hf(spec[3:])
    if os.path.isfile(os.path.join(spec, "tokenizer.json")):
        return load_tokenizer(spec)
    raise ValueError(f"unknown --tokenizer={spec}: use bpe, one of {', '.join(TIKTOKEN_NAMES)}, bytes, "
                     f"a directory holding a tokenizer.json, or hf:<model directory>")


# The chat template (ChatML) as Jinja, for Hugging Face's apply_chat_template; encode_chat is the
# same rendering, token for token, with the loss mask that finetuning uses.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT_ROLES = ("system", "user", "assistant")


def chat_problem(messages):
    """What is wrong with a conversation's messages, or None when nothing is."""
    if not isinstance(messages, list) or not messages:
        return "no non-empty 'messages' list"
    bad = next((m for m in messages if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES
                or not isinstance(m.get("content"), str)), None)
    if bad is not None:
        return f"a message is not {{'role': {'|'.join(CHAT_ROLES)}, 'content': str}}: {str(bad)[:100]}"
    return None


# A chat record in OpenAI's form, or ShareGPT's (renamed to OpenAI's).
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
CHAT_FORMATS = ('{"messages": [{"role": "system"|"user"|"assistant", "content": ...}]} (OpenAI) or '
                '{"conversations": [{"from": "system"|"human"|"gpt", "value": ...}]} (ShareGPT)')


def chat_messages(record):
    """(messages, problem) of one chat record in either format: OpenAI's {"messages": [{"role", "content"}]}
    or ShareGPT's {"conversations": [{"from", "value"}]}, the latter renamed to the former."""
    if isinstance(record, dict) and "conversations" in record and "messages" not in record:
        turns = record["conversations"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) and t.get("from") in SHAREGPT_ROLES
                                                  and isinstance(t.get("value"), str) for t in turns):
            return None, f"a ShareGPT turn is not {{'from': {'|'.join(SHAREGPT_ROLES)}, 'value': str}}"
        messages = [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in turns]
    elif isinstance(record, dict) and "messages" in record:
        messages = record["messages"]
    else:
        return None, "neither a 'messages' (OpenAI) nor a 'conversations' (ShareGPT) list"
    problem = chat_problem(messages)
    return (None, problem) if problem else ([{"role": m["role"], "content": m["content"]} for m in messages], None)


def encode_chat(enc, messages, add_generation_prompt=False):
    """(ids, mask): the conversation rendered as
        <|endoftext|><|im_start|>role\ncontent<|im_end|>\n ... [<|im_start|>assistant\n]
    mask[i] is 1 where token i is a target finetuning learns: the assistant's content and its
    <|im_end|>. Raises ValueError for messages that chat_problem finds wrong."""
    specials = enc._special_tokens
    ids, mask = [specials[BOS]], [0]
    problem = chat_problem(messages) if messages else None
    if problem:
        raise ValueError(problem)
    for message in messages:
        header = f"{message['role']}\n"
        # encoded as one piece, as a tokenizer of the rendered text would
        segment = enc.encode_ordinary(header + message["content"])
        learn = message["role"] == "assistant"
        # a token is content (and learned) if it ends past the header's bytes
        end = 0
        header_bytes = len(header.encode("utf-8"))
        segment_mask = []
        for token in segment:
            end += len(enc.decode_single_token_bytes(token))
            segment_mask.append(int(learn and end > header_bytes))
        ids += [specials["<|im_start|>"]] + segment + [specials["<|im_end|>"]] + enc.encode_ordinary("\n")
        mask += [0] + segment_mask + [int(learn)] + [0]
    if add_generation_prompt:
        ids += [specials["<|im_start|>"]] + enc.encode_ordinary("assistant\n")
        mask += [0] * (len(ids) - len(mask))
    return ids, mask


def token_byte_lengths(enc):
    """UTF-8 bytes each token id stands for (0 for special tokens), to turn loss into bits per byte."""
    lengths = np.zeros(enc.n_vocab, dtype=np.int64)
    for token, rank in enc._mergeable_ranks.items():
        lengths[rank] = len(token)
    return lengths
