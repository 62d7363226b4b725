"""export_hf.py: the exported model and tokenizer through transformers, against this repo's own."""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from infra.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from infra.resume import state_pieces
from conftest import ROOT, run_script
from export_hf import export
from model import GPT, ModelArgs

import tokenizer as tok

TEXT = "def f(x):\n    return {'ü': x ** 2}  # 日本語 🙂 1234567\n\n<|im_start|>user\nhi<|im_end|>\n\t trailing  "
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does json.dumps do?"},
                {"role": "assistant", "content": "Serialize obj to a JSON formatted str."}]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    texts = [open(os.path.join(ROOT, name)).read() for name in ("model.py", "train.py", "README.md")]
    return tok.train_bpe(iter(texts * 2), 700)


def make_checkpoint(directory, encoder, boost_padding=False, **overrides):
    args = dict(vocab_size=encoder.n_vocab, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, rope_base=500.0)
    torch.manual_seed(0)
    model = GPT(ModelArgs(**{**args, **overrides}))
    with torch.no_grad():  # norm gains away from 1, so a wrong norm would show
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
        if boost_padding:  # the padding rows' logits would win everywhere, were they not suppressed
            model.lm_head.weight[encoder.n_vocab:] = model.lm_head.weight[:encoder.n_vocab].abs().max() * 50
    save_checkpoint(
        str(directory),
        1,
        state_pieces(model, {}, 0, 1),
        {
            "step": 1,
            "tokens_seen": 0,
            "model_args": vars(model.args),
            "config": {},
            "tokenizer": tok.tokenizer_state(encoder),
            "data_dir": "",
            "parent": None,
        },
    )
    return load_checkpoint(str(directory))


@pytest.mark.parametrize("variant", [{}, {"qk_norm": True}, {"tie_embeddings": True, "n_kv_head": 4}],
                         ids=["llama", "qwen3", "tied"])
def test_exported_logits_match(tmp_path, encoder, variant):
    checkpoint = make_checkpoint(tmp_path / "run", encoder, **variant)
    config = export(checkpoint, str(tmp_path / "hf"), "float32")
    assert config["model_type"] == ("qwen3" if variant.get("qk_norm") else "llama")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    model, _ = model_from_checkpoint(checkpoint)
    idx = torch.tensor([encoder.encode(TEXT, allowed_special="all")[:64]])
    with torch.no_grad():
        difference = (hf_model(idx).logits - model.eval()(idx)).abs().max().item()
    assert difference <= 1e-4
    # and back: init_from='hf:<dir>' reads the same model
    again, enc_again = model_from_checkpoint(load_checkpoint(f"hf:{tmp_path}/hf"))
    with torch.no_grad():
        assert (again.eval()(idx) - model(idx)).abs().max().item() <= 1e-6
    assert enc_again.encode(TEXT, allowed_special="all") == encoder.encode(TEXT, allowed_special="all")


def test_sharded_export_loads(tmp_path, encoder):
    checkpoint = make_checkpoint(tmp_path / "run", encoder)
    export(checkpoint, str(tmp_path / "hf"), "bfloat16", max_shard_size_mb=0.1)
    assert all(
        os.stat(tmp_path / "hf" / name).st_mode & 0o044 == 0o044 for name in os.listdir(tmp_path / "hf")
    )  # readable
    with open(tmp_path / "hf" / "model.safetensors.index.json") as f:
        files = set(json.load(f)["weight_map"].values())
    assert len(files) > 3 and not (tmp_path / "hf" / "model.safetensors").exists()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert hf_model.dtype == torch.bfloat16


def test_tokenizer_and_chat_template(tmp_path, encoder):
    export(make_checkpoint(tmp_path / "run", encoder), str(tmp_path / "hf"))
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    bos = tok.bos_id(encoder)
    # tokenizer(text) adds the BOS every training document began with; a literal special-token string
    # in the text becomes the special token (transformers' way), unless split_special_tokens=True,
    # which gives exactly tokenizer.py's ids for the text
    assert hf_tokenizer(TEXT).input_ids == [bos] + encoder.encode(TEXT, allowed_special="all")
    assert hf_tokenizer(TEXT, split_special_tokens=True).input_ids == [bos] + encoder.encode_ordinary(TEXT)
    assert hf_tokenizer(TEXT, add_special_tokens=False).input_ids == encoder.encode(TEXT, allowed_special="all")
    assert hf_tokenizer.decode(encoder.encode(TEXT, allowed_special="all")) == TEXT
    # in a chat message, tokenizer.py keeps "<|im_end|>" as text; transformers' template makes it the token
    injected = [{"role": "user", "content": "hi<|im_end|>"}]
    ours = tok.encode_chat(encoder, injected)[0]
    theirs = hf_tokenizer.apply_chat_template(injected, tokenize=True, return_dict=True)["input_ids"]
    im_end = encoder._special_tokens["<|im_end|>"]
    assert ours.count(im_end) == 1 and theirs.count(im_end) == 2
    rendered = hf_tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    ids, mask = tok.encode_chat(encoder, CONVERSATION)
    assert rendered == ids
    prompt = hf_tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=True, add_generation_prompt=True,
                                              return_dict=True)["input_ids"]
    assert prompt == tok.encode_chat(encoder, CONVERSATION[:2], add_generation_prompt=True)[0]
    # the mask covers exactly the assistant's content and its <|im_end|>
    learned = [t for t, m in zip(ids, mask) if m]
    assert encoder.decode(learned) == CONVERSATION[2]["content"] + "<|im_end|>"


def test_gpt2_tokenizer_export(tmp_path, gpt2):
    export(make_checkpoint(tmp_path / "run", gpt2, n_embd=32, n_head=2, n_kv_head=1, n_layer=1), str(tmp_path / "hf"))
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf_tokenizer(TEXT, add_special_tokens=False).input_ids == gpt2.encode(TEXT, allowed_special="all")


def test_greedy_generation_matches_sample_py(tmp_path, encoder):
    make_checkpoint(tmp_path / "run", encoder, boost_padding=True)
    # export_hf.py's defaults, loaded in the precision the export's config names: the checkpoint's, float32
    run_script("export_hf.py", f"--ckpt={tmp_path}/run", f"--hf_dir={tmp_path}/hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype="auto").eval()
    assert hf_model.dtype == torch.float32
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    bos = tok.bos_id(encoder)
    # as a new user would: the tokenizer's ids (BOS added) straight into generate, the export's generation config
    prompt = hf_tokenizer("def ", return_tensors="pt").input_ids
    out = hf_model.generate(prompt, max_new_tokens=32, do_sample=False)
    new_tokens = [t for t in out[0, prompt.size(1):].tolist() if t != bos]
    assert hf_tokenizer.decode(out[0, prompt.size(1):], skip_special_tokens=True) == encoder.decode(new_tokens)
    result = run_script("sample.py", f"--out_dir={tmp_path}/run", "--start=def ", "--num_samples=1",
                        "--max_new_tokens=32", "--temperature=0", "--device=cpu")
    assert len(new_tokens) > 0
    assert result.stdout == "def " + encoder.decode(new_tokens) + "\n"


def test_sample_py_stops_where_the_export_stops(tmp_path, encoder):
    # a model that ends its turn after a few tokens, as a finetuned one does on a plain prompt: every
    # logit 0 but <|im_end|>'s (h . w) and one other token's (-h . w), so one of the two always wins
    checkpoint = make_checkpoint(tmp_path / "run", encoder)
    im_end, other = encoder._special_tokens["<|im_end|>"], encoder.encode_ordinary("x")[0]
    weights = checkpoint["model"]["lm_head.weight"]
    direction = torch.randn(weights.shape[1], generator=torch.Generator().manual_seed(1))
    weights.zero_()
    weights[im_end], weights[other] = direction, -direction
    save_checkpoint(
        str(tmp_path / "ended"),
        1,
        {f"model/{k}": (v, 0, tuple(v.shape)) for k, v in checkpoint["model"].items()},
        {k: checkpoint[k] for k in ("step", "tokens_seen", "model_args", "config", "tokenizer", "parent")},
    )
    export(load_checkpoint(str(tmp_path / "ended")), str(tmp_path / "hf"), "float32")
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert im_end in generation["eos_token_id"] and generation["max_new_tokens"] == 32  # half the 64-token window
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    prompt = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))("def ", return_tensors="pt").input_ids
    generated = hf_model.generate(prompt, do_sample=False)[0, prompt.size(1):].tolist()
    assert generated[-1] == im_end and im_end not in generated[:-1]
    result = run_script("sample.py", f"--out_dir={tmp_path}/ended", "--start=def ", "--num_samples=1",
                        "--temperature=0", "--device=cpu")
    assert result.stdout == "def " + encoder.decode(generated[:-1]) + "\n"


def test_unsupported_models_are_refused(tmp_path, encoder):
    checkpoint = make_checkpoint(tmp_path / "run", encoder)
    checkpoint["model_args"]["sliding_window"] = 128
    with pytest.raises(ValueError, match="sliding_window"):
        export(checkpoint, str(tmp_path / "bad"))
    export(make_checkpoint(tmp_path / "run2", encoder), str(tmp_path / "hf"))
    config_path = tmp_path / "hf" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(
        json.dumps({**config, "attention_bias": True, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    )
    with pytest.raises(ValueError, match="rope_scaling.*attention_bias"):
        load_checkpoint(f"hf:{tmp_path}/hf")


@pytest.mark.slow
def test_train_starts_from_a_hugging_face_directory(tmp_path, data, other_data):
    data_tokenizer = tok.load_tokenizer(data)
    export(make_checkpoint(tmp_path / "run", data_tokenizer), str(tmp_path / "hf"))
    result = run_script("train.py", f"--init_from=hf:{tmp_path}/hf", f"--data_dir={data}",
                        f"--out_dir={tmp_path}/out", "--device=cpu", "--compile=False", "--max_iters=2",
                        "--micro_batch_size=2", "--batch_size=2", "--eval_iters=1", "--log_interval=1", check=False)
    assert result.returncode == 0, result.stderr
    assert f"weights from hf:{tmp_path}/hf" in result.stdout
    assert load_checkpoint(str(tmp_path / "out"))["parent"] == f"hf:{tmp_path}/hf"
    # the data must be tokenized by the model's own tokenizer
    bad = run_script("train.py", f"--init_from=hf:{tmp_path}/hf", f"--data_dir={other_data}",
                     f"--out_dir={tmp_path}/out2", "--device=cpu", check=False)
    assert bad.returncode != 0 and "was trained with another tokenizer" in bad.stderr
    # and prepare.py can take it: --tokenizer=hf:<dir>
    run_script("prepare.py", f"--out={tmp_path}/same", f"--tokenizer=hf:{tmp_path}/hf", "--max_docs=100")
    assert tok.load_tokenizer(str(tmp_path / "same")).encode_ordinary(TEXT) == data_tokenizer.encode_ordinary(TEXT)
