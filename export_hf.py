"""
Export a checkpoint as a Hugging Face transformers model (Llama layout; Qwen3 when qk_norm is on):
    python export_hf.py --ckpt=out/finetune --hf_dir=hf/my-model [--dtype=bfloat16]
float32 by default: the checkpoint's own weights, so the export's logits and greedy text are sample.py's
(on the CPU, exactly); bfloat16 halves the files (2 GB for the 1B model) at bf16's rounding (the tiny
pipeline's logits then move by ~0.1 and greedy text parts from sample.py's after a dozen tokens).
writes config.json, generation_config.json, model.safetensors (or shards and an index above
max_shard_size_mb), tokenizer.json and tokenizer_config.json (with the chat template), so that
    AutoModelForCausalLM.from_pretrained(dir), AutoTokenizer.from_pretrained(dir)
work offline. Needs only safetensors: the JSON files are written directly.

The tokenizer: tokenizer(text) begins with <|endoftext|>, the BOS every training document began
with (as Llama's tokenizers add <s>), so tokenizer(text) + generate continues text as sample.py
does. Special-token text is where it differs from tokenizer.py: transformers turns a literal
"<|endoftext|>", "<|im_start|>" or "<|im_end|>" written in the text into that special token, in
tokenizer(text) and in apply_chat_template alike (every Hugging Face tokenizer does; the chat
template itself is tokenized that way, so it cannot be switched off there); tokenizer.py never
does. For text you do not control, tokenizer(text, split_special_tokens=True) gives tokenizer.py's
ids; check chat messages for those strings before apply_chat_template (tests/test_export.py pins
both behaviours).

The reverse, reading such a directory as a checkpoint (init_from='hf:<dir>'), is
checkpoint.open_checkpoint("hf:<dir>").
"""
import json
import os
import sys

# ----------------------------------------------------------------------------------------------
ckpt = "out/run"                # a run directory (its newest checkpoint) or one checkpoint (ckpt_<step>)
hf_dir = "hf/model"
dtype = "float32"               # 'float32' (the checkpoint's weights as they are) or 'bfloat16' (half the size)
max_shard_size_mb = 5000        # larger models are split into shards of at most this size
# ----------------------------------------------------------------------------------------------

from infra.rundir import check_replaceable, claim_output, replace_directory
import tokenizer as tok  # (a module, not names: configurator.py treats simple-typed globals as config)

# what export() writes: the only files a directory it replaces may hold
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
                "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json")

# ModelArgs fields and what they become; a checkpoint with any other field is refused
KNOWN_MODEL_ARGS = {"vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "mlp_ratio",
                    "rope_base", "qk_norm", "tie_embeddings", "norm_eps"}


def hf_config(model_args, dtype_name, special_tokens):
    from model import ModelArgs
    unknown = set(model_args) - KNOWN_MODEL_ARGS
    if unknown:
        raise ValueError(f"the model uses {sorted(unknown)}, which the Llama/Qwen3 layout cannot express")
    a = ModelArgs(**model_args)
    config = {
        "architectures": ["Qwen3ForCausalLM" if a.qk_norm else "LlamaForCausalLM"],
        "model_type": "qwen3" if a.qk_norm else "llama",
        "vocab_size": a.padded_vocab_size,
        "hidden_size": a.n_embd,
        "intermediate_size": a.mlp_hidden_dim,
        "num_hidden_layers": a.n_layer,
        "num_attention_heads": a.n_head,
        "num_key_value_heads": a.n_kv_head,
        "head_dim": a.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": a.block_size,
        "rms_norm_eps": a.norm_eps,
        "rope_theta": a.rope_base,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": a.tie_embeddings,
        "bos_token_id": special_tokens[tok.BOS],
        "eos_token_id": special_tokens[tok.BOS],
        "torch_dtype": dtype_name,
        "use_cache": True,
    }
    if a.qk_norm:
        config.update({"use_sliding_window": False, "sliding_window": None, "max_window_layers": a.n_layer})
    return config


def recover_merges(ranks):
    """tiktoken keeps only ranks; a BPE tokenizer.json wants merges. A token's merge is the last step
    of byte-pair merging its bytes using only tokens of lower rank."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], float("inf")))
            if ranks.get(parts[best] + parts[best + 1], float("inf")) >= rank:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not a merge of two lower-ranked tokens")
        merges.append(parts)
    return merges


def tokenizer_json(enc):
    to_unicode = tok.bytes_to_unicode()
    text = lambda token: "".join(to_unicode[b] for b in token)  # noqa: E731
    ranks = enc._mergeable_ranks
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": t,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for t, i in sorted(enc._special_tokens.items(), key=lambda x: x[1])
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": enc._pat_str}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        # every document the model saw began with <|endoftext|>: tokenizer(text) adds it, as Llama's tokenizers add <s>
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": tok.BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": tok.BOS, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": tok.BOS, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {tok.BOS: {"id": tok.BOS, "ids": [tok.bos_id(enc)], "tokens": [tok.BOS]}},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": {text(token): rank for token, rank in ranks.items()},
            "merges": [[text(a), text(b)] for a, b in recover_merges(ranks)],
        },
    }


def export(checkpoint, hf_dir, dtype_name="float32", max_shard_size_mb=5000):
    from safetensors.torch import save_file
    import torch
    if dtype_name not in ("bfloat16", "float32"):
        raise ValueError(f"dtype must be 'bfloat16' or 'float32', got {dtype_name!r}")
    check_replaceable(hf_dir, EXPORT_FILES, "a Hugging Face export")
    enc = tok.tokenizer_from_state(checkpoint["tokenizer"])
    if tok.missing_special_tokens(enc._special_tokens):
        raise ValueError(f"the tokenizer lacks the special tokens {tok.missing_special_tokens(enc._special_tokens)}")
    config = hf_config(checkpoint["model_args"], dtype_name, enc._special_tokens)
    tensors = {}
    for name, tensor in checkpoint["model"].items():
        if name == "lm_head.weight" and config["tie_word_embeddings"]:
            continue  # transformers ties it to the embedding
        hf_name = name if name.startswith("lm_head.") else "model." + name
        tensors[hf_name] = tensor.detach().to(getattr(torch, dtype_name)).contiguous()

    tmp = claim_output(hf_dir, tool="export_hf.py", option="hf_dir")
    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_size_mb * 2**20:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(tmp, file), metadata={"format": "pt"})
            weight_map.update({name: file for name in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        write_json(
            os.path.join(tmp, "model.safetensors.index.json"),
            {"metadata": {"total_size": total}, "weight_map": weight_map},
        )
    write_json(os.path.join(tmp, "config.json"), config)
    specials = enc._special_tokens
    # the embedding rows past the tokenizer's vocabulary are padding: never generate them
    write_json(os.path.join(tmp, "generation_config.json"), {
        "bos_token_id": specials[tok.BOS], "eos_token_id": [specials[tok.BOS], specials["<|im_end|>"]],
        "pad_token_id": specials[tok.BOS], "suppress_tokens": list(range(enc.n_vocab, config["vocab_size"])),
        # the window holds the prompt too: half of it for the answer, at most 256 tokens
        "max_new_tokens": min(256, max(1, checkpoint["model_args"]["block_size"] // 2))})
    write_json(os.path.join(tmp, "tokenizer.json"), tokenizer_json(enc))
    write_json(os.path.join(tmp, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok.BOS, "eos_token": tok.BOS, "pad_token": tok.BOS,
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": checkpoint["model_args"]["block_size"], "chat_template": tok.CHAT_TEMPLATE})
    for name in os.listdir(tmp):  # as readable as the directory (safetensors creates its files 0600)
        os.chmod(os.path.join(tmp, name), os.stat(tmp).st_mode & 0o666)
    replace_directory(tmp, hf_dir)
    return config


def write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
    from infra.checkpoint import load_checkpoint  # after the config: --help answers without loading torch
    try:
        check_replaceable(hf_dir, EXPORT_FILES, "a Hugging Face export")  # before the checkpoint is read
        checkpoint = load_checkpoint(ckpt)
        config = export(checkpoint, hf_dir, dtype, max_shard_size_mb)
    except OSError as e:  # a directory that cannot be written
        sys.exit(f"export_hf.py: error: cannot write {hf_dir}: {e.strerror or e} ({e.filename or hf_dir})")
    except ValueError as e:
        sys.exit(f"export_hf.py: error: {e}")
    print(f"exported {checkpoint['path']} (step {checkpoint['step']}) to {hf_dir} as "
          f"{config['architectures'][0]}, {dtype}")
