"""
Reading a Hugging Face model directory as a checkpoint of weights alone (init_from='hf:<dir>',
checkpoint.open_checkpoint('hf:<dir>')): the Llama and Qwen3 layouts that export_hf.py writes, and
those of other models with the same shape (no biases, no sliding window, default RoPE, SiLU). The
config.json is checked whole against the weights there before anything is read.
"""
import os

from data import read_json
from model import ModelArgs, check_model_args, parameter_shapes
import tokenizer as tok


def open_hf(directory):
    """A Llama- or Qwen3-layout safetensors model and its byte-level BPE tokenizer, opened as a
    checkpoint of the weights alone (step 0, no optimizer state): what init_from='hf:<dir>' starts from.
    (meta, read): meta as a checkpoint's, with "parameters" (our parameter names) for checkpoint.py to
    name as tensors; read(parameter, first=None, last=None)."""
    from safetensors import safe_open
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no Hugging Face model at {directory} (no config.json)")
    config = read_json(config_path, fix="download or export the model again")
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size"):
        if key not in config:
            raise ValueError(f"{config_path} lacks {key!r}")
        if not (type(config[key]) is int and 1 <= config[key] <= 2**24):
            raise ValueError(f"{config_path}: {key} must be an integer in [1, 2**24], got {config[key]!r}")
    model_type = config.get("model_type")
    if model_type not in ("llama", "qwen3"):
        raise ValueError(f"{directory}: model_type {model_type!r} is not supported (llama or qwen3 only)")
    unsupported = [
        key
        for key, ok in [
            (
                "rope_scaling",
                not config.get("rope_scaling")
                and (config.get("rope_parameters") or {}).get("rope_type", "default") == "default",
            ),
            ("attention_bias", not config.get("attention_bias", False)),
            ("mlp_bias", not config.get("mlp_bias", False)),
            ("hidden_act", config.get("hidden_act", "silu") == "silu"),
            ("sliding_window", not config.get("use_sliding_window", False)),
            (
                "head_dim",
                config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
                == config["hidden_size"] // config["num_attention_heads"],
            ),
            ("vocab_size", config["vocab_size"] % 128 == 0),
        ]
        if not ok
    ]
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
    where = {}  # our parameter name -> (open file, its name there)
    for file in files:
        handle = safe_open(os.path.join(directory, file), framework="pt")
        for key in handle.keys():
            where[key.removeprefix("model.")] = (handle, key)
    tie = config.get("tie_word_embeddings", False)
    if tie:  # one matrix for both: ours is the embedding's
        where.pop("lm_head.weight", None)
    enc = tok.tokenizer_from_hf(directory)
    if enc.n_vocab > config["vocab_size"]:
        raise ValueError(f"{directory}: the tokenizer has {enc.n_vocab} tokens, the model {config['vocab_size']}")
    model_args = {"vocab_size": enc.n_vocab, "block_size": config.get("max_position_embeddings", 2048),
                  "n_layer": config["num_hidden_layers"], "n_head": config["num_attention_heads"],
                  "n_kv_head": config.get("num_key_value_heads", config["num_attention_heads"]), "n_embd": n_embd,
                  "mlp_ratio": mlp_hidden / n_embd, "rope_base": float(rope_base), "qk_norm": model_type == "qwen3",
                  "tie_embeddings": tie, "norm_eps": config.get("rms_norm_eps", 1e-5)}
    if check_model_args(model_args, config_path).padded_vocab_size != config["vocab_size"]:
        raise ValueError(f"{directory}: vocab_size {config['vocab_size']} is not the tokenizer's {enc.n_vocab} "
                         f"padded to a multiple of 128")
    expected = parameter_shapes(ModelArgs(**model_args))
    for name, shape in expected.items():  # the weights there are the model config.json describes
        if name not in where:
            raise ValueError(
                f"{directory}: the weight {name} is missing (does num_hidden_layers="
                f"{config['num_hidden_layers']} in {config_path} match the weights?)"
            )
        stored = list(where[name][0].get_slice(where[name][1]).get_shape())
        if stored != shape:
            raise ValueError(f"{directory}: {where[name][1]} has shape {stored}, {config_path} says {shape}")
    extra = sorted(set(where) - set(expected))
    if extra:
        raise ValueError(
            f"{directory}: weights {config_path} does not describe, e.g. {extra[0]} "
            f"(does num_hidden_layers={config['num_hidden_layers']} match the weights?)"
        )

    def read(name, first=None, last=None):
        handle, key = where[name]
        rows = handle.get_slice(key)
        return rows[first or 0:rows.get_shape()[0] if last is None else last].float()
    return {"model_args": model_args, "tokenizer": tok.tokenizer_state(enc), "config": {}, "step": 0, "tokens_seen": 0,
            "parent": None, "path": "hf:" + directory, "parameters": list(where)}, read
