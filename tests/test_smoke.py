"""Fast end-to-end checks (about a minute on 2 CPU cores): python -m pytest"""
import json
import math
import os

import numpy as np
import pytest

from conftest import run_script as run

# a model small enough that a step takes milliseconds on a CPU
TINY_MODEL = ["tests/tiny_model.py", "--eval_iters=4"]


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """The demo corpus with a 1024-token vocabulary (the session's `data` has 512: too few for the margins below)."""
    out = str(tmp_path_factory.mktemp("data") / "demo")
    run("prepare.py", f"--out={out}", "--vocab_size=1024")
    return out


@pytest.fixture(scope="module")
def trained(demo_data, tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("out") / "run")
    run("train.py", *TINY_MODEL, f"--data_dir={demo_data}", f"--out_dir={out_dir}", "--max_iters=60",
        "--micro_batch_size=16", "--batch_size=32", "--learning_rate=1e-2", "--min_lr=1e-3", "--warmup_iters=4",
        "--eval_interval=30", "--log_interval=1")
    return out_dir


def unigram_val_loss(data_dir):
    """Cross-entropy on the val split of a unigram model of the train split (add-one smoothed)."""
    from data import read_shard
    with open(os.path.join(data_dir, "meta.json")) as f:
        meta = json.load(f)
    split = {s: np.concatenate([read_shard(os.path.join(data_dir, n)) for n in meta["splits"][s]["shards"]])
             for s in ("train", "val")}
    counts = np.bincount(split["train"], minlength=meta["vocab_size"]) + 1
    return float(-np.log(counts / counts.sum())[split["val"]].mean())


def test_training_loss_falls_well_below_uniform_and_unigram(trained, demo_data):
    train, val = metrics(trained)
    assert [r["step"] for r in train] == list(range(1, 61))
    uniform = math.log(1024)
    assert train[0]["loss"] > uniform - 0.5          # starts near the uniform guess
    assert train[-1]["loss"] < uniform - 1.5          # and learns far past it within 60 steps
    assert [r["step"] for r in val] == [0, 30, 60]
    assert val[-1]["val_loss"] < uniform - 1.5 and 0 < val[-1]["val_bpb"] < val[0]["val_bpb"]
    assert val[-1]["val_loss"] < unigram_val_loss(demo_data) - 0.5  # it uses context, not just frequencies
    assert all(math.isfinite(r["grad_norm"]) and r["tokens_per_s"] > 0 for r in train)
    assert train[-1]["tokens"] == 60 * 32 * 64
    assert sorted(os.listdir(trained)) == [".lock", "ckpt_0000030", "ckpt_0000060", "config.py", "metrics.jsonl"]
    assert open(os.path.join(trained, ".lock")).read() == ""  # released at the end: no PID left behind


def test_cosine_schedule_values(trained):
    # metrics record the lr of the step just taken: record n holds lr_at(n - 1)
    lr = {r["step"] - 1: r["lr"] for r in metrics(trained)[0]}
    peak, low = 1e-2, 1e-3
    assert lr[0] == pytest.approx(peak / 4) and lr[3] == pytest.approx(peak)  # warmup
    assert lr[4] == pytest.approx(peak)                                       # cosine starts at the peak
    assert lr[32] == pytest.approx((peak + low) / 2)                         # half way through 4..60
    assert lr[59] == pytest.approx(low + (peak - low) * 0.5 * (1 + math.cos(math.pi * 55 / 56)))


def test_sample_from_checkpoint(trained):
    result = run("sample.py", f"--out_dir={trained}", "--start=def ", "--num_samples=1", "--max_new_tokens=30",
                 "--temperature=0", "--device=cpu")
    assert result.stdout.startswith("def ") and len(result.stdout) > 10
    again = run("sample.py", f"--out_dir={trained}", "--start=def ", "--num_samples=1", "--max_new_tokens=30",
                "--temperature=0", "--device=cpu")
    assert again.stdout == result.stdout  # greedy is deterministic
    assert "ckpt_0000060" in result.stderr


def test_linear_and_wsd_schedules_and_batch_doubling(demo_data, tmp_path):
    common = [*TINY_MODEL, f"--data_dir={demo_data}", "--max_iters=12", "--warmup_iters=2", "--learning_rate=1e-3",
              "--min_lr=1e-4", "--log_interval=1", "--eval_interval=100", "--micro_batch_size=4"]
    run("train.py", *common, f"--out_dir={tmp_path}/linear", "--lr_schedule=linear", "--batch_size=8")
    lr = {r["step"] - 1: r["lr"] for r in metrics(f"{tmp_path}/linear")[0]}
    assert (
        lr[1] == pytest.approx(1e-3) and lr[7] == pytest.approx(5.5e-4) and lr[11] == pytest.approx(1e-3 - 9e-4 * 0.9)
    )

    schedule = ("--batch_size_schedule={'strategy': 'doubling', 'start_batch_size': 8, 'interval_steps': 4, "
                "'max_batch_size': 32}")
    run("train.py", *common, f"--out_dir={tmp_path}/wsd", "--lr_schedule=wsd", "--wsd_decay_frac=0.5", schedule)
    records = metrics(f"{tmp_path}/wsd")[0]
    lr = {r["step"] - 1: r["lr"] for r in records}
    assert lr[5] == pytest.approx(1e-3) and lr[6] == pytest.approx(1e-3) and lr[9] == pytest.approx(5.5e-4)
    # steps 0-3: 8 sequences (2 micro-batches of 4), 4-7: 16, 8-11: 32
    assert [r["grad_accum"] for r in records] == [2] * 4 + [4] * 4 + [8] * 4
    assert records[-1]["tokens"] == (4 * 8 + 4 * 16 + 4 * 32) * 64


def test_bad_batch_size_names_the_values_that_work(demo_data, tmp_path):
    result = run("train.py", *TINY_MODEL, f"--data_dir={demo_data}", f"--out_dir={tmp_path}", "--micro_batch_size=8",
                 "--batch_size=20", check=False)
    assert result.returncode != 0
    assert (
        "batch size 20 is not a multiple of micro_batch_size x world_size = 8 x 1 = 8; use e.g. 16 or 24"
        in result.stderr
    )


@pytest.mark.slow
def test_restart_refuses_to_overwrite_and_resume_continues(demo_data, tmp_path):
    args = [*TINY_MODEL, f"--data_dir={demo_data}", f"--out_dir={tmp_path}", "--micro_batch_size=4", "--batch_size=4",
            "--eval_interval=5", "--log_interval=1"]
    run("train.py", *args, "--max_iters=5")
    again = run("train.py", *args, "--max_iters=10", check=False)
    assert again.returncode != 0 and "--init_from=resume" in again.stderr
    run("train.py", *args, "--max_iters=10", "--init_from=resume")
    steps = [r["step"] for r in metrics(str(tmp_path))[0]]
    assert steps == list(range(1, 11))
    assert os.path.exists(tmp_path / "ckpt_0000010")


# ---- configurator: exercised on a stand-in script, without importing torch -------------------
CONFIG_SCRIPT = (
    "learning_rate = 6e-4; n_layer = 12; out_dir = 'out'; compile = None; schedule = None; "
    "exec(open('configurator.py').read()); print(repr((learning_rate, n_layer, out_dir, compile, schedule)))"
)


def configure(*args):
    return run("-c", CONFIG_SCRIPT, *args, check=False)


def test_configurator_overrides_in_order(tmp_path):
    first, second = tmp_path / "a.py", tmp_path / "b.py"
    first.write_text("n_layer = 4\nout_dir = 'out/a'\n")
    second.write_text("import math\n_helper = 3\nout_dir = out_dir + '-tiny'\nlearning_rate = math.sqrt(4) * 1e-3\n")
    result = configure(str(first), str(second), "--n_layer=2", "--learning_rate=1", "--compile=True",
                       "--schedule={'start': 1}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1.0, 2, 'out/a-tiny', True, {'start': 1})"
    assert configure("--out_dir=a=b/c").stdout.strip().endswith("'a=b/c', None, None)")
    assert configure("--out_dir=123").stdout.strip().endswith("'123', None, None)")


def test_configurator_errors(tmp_path):
    result = configure("--n_layers=3")
    assert result.returncode != 0
    assert result.stderr.strip() == "config error: unknown config key 'n_layers' in --n_layers; did you mean 'n_layer'?"
    bad_file = tmp_path / "bad.py"
    bad_file.write_text("learning_rte = 1e-3\n")
    result = configure(str(bad_file))
    assert result.returncode != 0 and "'learning_rte'" in result.stderr and "'learning_rate'" in result.stderr
    result = configure("--n_layer=2.5")
    assert result.returncode != 0
    assert "n_layer expects int (like the default 12), got float 2.5" in result.stderr
    result = configure("no_such_config.py")
    assert result.returncode != 0 and "config file not found: no_such_config.py" in result.stderr
    result = configure("--n_layer")
    assert result.returncode != 0 and "has no value" in result.stderr


def test_every_script_explains_its_settings():
    for script, setting in [
        ("train.py", "--learning_rate=0.0006\n        peak"),
        ("prepare.py", "--chat=False\n        the .jsonl"),
        ("sample.py", "--temperature=0.8\n        0: greedy"),
        ("export_hf.py", "--dtype='float32'"),
        ("bench.py", "--bench_steps=10\n        timed steps"),
    ]:
        result = run(script, "--help")
        assert setting in result.stdout, (script, result.stdout[-2000:])


def test_the_command_line_wins_and_config_files_derive_from_it(tmp_path):
    # configs/tiny.py derives warmup_iters and eval_interval from max_iters: from the command line's value
    result = run("train.py", "configs/pretrain.py", "configs/tiny.py", "--max_iters=100", "--learning_rate=0.01",
                 "--print_config")
    config = dict(line.split(" = ", 1) for line in result.stdout.splitlines())
    assert (config["max_iters"], config["warmup_iters"], config["eval_interval"]) == ("100", "5", "50")
    assert config["learning_rate"] == "0.01" and config["out_dir"] == "'out/pretrain-tiny'"
    # a config file that fails says where, in one line
    (tmp_path / "raises.py").write_text("n_layer = 4\nn_head = n_layers // 2\n")
    (tmp_path / "syntax.py").write_text("n_layer = 4\nn_head = (\n")
    for name, message in [("raises.py", "raises.py:2: NameError: name 'n_layers' is not defined"),
                          ("syntax.py", "syntax.py:2: SyntaxError")]:
        result = run("train.py", str(tmp_path / name), check=False)
        assert result.returncode != 0 and result.stderr.strip().startswith(f"config error: {tmp_path / name}"), (
            result.stderr
        )
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = run("train.py", "configs/tiny.py", check=False)  # the overlay alone: which stage would it shrink?
    assert result.returncode != 0 and "name the stage first" in result.stderr
    result = run("train.py", "configs/pretrain", check=False)
    assert result.returncode != 0 and "unexpected argument 'configs/pretrain': config files end in .py" in result.stderr


# ---- tokenizer and shards ---------------------------------------------------------------------
def test_tokenizer_round_trip(tmp_path):
    import tokenizer as tok
    texts = ["def add(a, b):\n    return a + b\n", "Hello, world! Ünïcödé text 1234.\n"] * 50
    enc = tok.train_bpe(iter(texts), 300)
    assert enc.n_vocab == 300 and tok.bos_id(enc) == 300 - len(tok.SPECIAL_TOKENS)
    tok.save_tokenizer(enc, str(tmp_path))
    loaded = tok.load_tokenizer(str(tmp_path))
    for text in texts[:2] + ["unseen: 日本語 🙂 \t\r\n"]:
        ids = loaded.encode_ordinary(text)
        assert ids == enc.encode_ordinary(text) and loaded.decode(ids) == text
    assert loaded.encode("<|im_start|>", allowed_special="all") == [enc._special_tokens["<|im_start|>"]]
    assert tok.token_byte_lengths(loaded)[tok.bos_id(loaded)] == 0
    assert sum(tok.token_byte_lengths(loaded)[loaded.encode_ordinary(texts[1])]) == len(texts[1].encode())


def test_gpt2_tokenizer_offline(gpt2, tmp_path):
    import tokenizer as tok
    assert gpt2.encode_ordinary("Hello world") == [15496, 995]
    assert tok.bos_id(gpt2) == 50256 and gpt2._special_tokens["<|im_start|>"] == 50257 and gpt2.n_vocab == 50264
    tok.save_tokenizer(gpt2, str(tmp_path))
    assert tok.load_tokenizer(str(tmp_path)).encode_ordinary("Hello world") == [15496, 995]


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_shard_round_trip(tmp_path, dtype):
    from data import read_shard, write_shard
    tokens = np.random.default_rng(0).integers(0, np.iinfo(dtype).max, size=1000, dtype=np.int64).astype(dtype)
    path = str(tmp_path / "shard.bin")
    write_shard(path, tokens)
    assert os.path.getsize(path) == 32 + 1000 * np.dtype(dtype).itemsize
    assert np.array_equal(read_shard(path), tokens) and read_shard(path).dtype == dtype
    with open(path, "r+b") as f:
        f.truncate(32 + 999 * np.dtype(dtype).itemsize)
    with pytest.raises(ValueError, match="truncated"):
        read_shard(path)


def test_prepare_text_and_jsonl_sources(tmp_path):
    (tmp_path / "docs").mkdir()
    for i in range(30):
        (tmp_path / "docs" / f"{i}.txt").write_text(f"Document {i}. The quick brown fox jumps over the lazy dog.\n")
    with open(tmp_path / "docs" / "more.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"text": f"Record {i}: lorem ipsum dolor sit amet."}) + "\n")
    out = tmp_path / "ds"
    run("prepare.py", str(tmp_path / "docs"), f"--out={out}", "--vocab_size=300", "--val_fraction=0.2", "--workers=2")
    meta = json.loads((out / "meta.json").read_text())
    splits = meta["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == 60 and splits["val"]["documents"] > 0
    from data import read_shard
    import tokenizer as tok
    enc = tok.load_tokenizer(str(out))
    tokens = np.concatenate([read_shard(str(out / name)) for name in splits["train"]["shards"]])
    assert len(tokens) == splits["train"]["tokens"] and tokens[0] == meta["bos_id"]
    documents = enc.decode(tokens.tolist()).split("<|endoftext|>")[1:]
    assert len(documents) == splits["train"]["documents"]
    assert all(d.startswith(("Document ", "Record ")) for d in documents)


def test_prepare_parquet_source(tmp_path):
    import pyarrow as pa  # requirements-dev.txt: a missing install fails here rather than skipping
    import pyarrow.parquet as pq
    texts = [f"Row {i}: the quick brown fox." for i in range(40)] + [None]  # a null row is skipped
    pq.write_table(pa.table({"id": list(range(41)), "body": texts}), tmp_path / "rows.parquet", row_group_size=16)
    out = tmp_path / "ds"
    run("prepare.py", str(tmp_path / "rows.parquet"), f"--out={out}", "--text_field=body", "--vocab_size=300",
        "--val_fraction=0.2")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 40
    from data import read_shard
    import tokenizer as tok
    tokens = np.concatenate([read_shard(str(out / name)) for name in meta["splits"]["train"]["shards"]])
    documents = tok.load_tokenizer(str(out)).decode(tokens.tolist()).split("<|endoftext|>")[1:]
    assert len(documents) == meta["splits"]["train"]["documents"] and all(d.startswith("Row ") for d in documents)
    result = run("prepare.py", str(tmp_path / "rows.parquet"), f"--out={tmp_path}/bad", check=False)
    assert result.returncode != 0 and "no column 'text' (columns: id, body; use --text_field)" in result.stderr


def test_prepare_bad_input(tmp_path):
    result = run("prepare.py", str(tmp_path / "missing.txt"), f"--out={tmp_path}/a", check=False)
    assert result.returncode != 0 and "no such file, directory or glob" in result.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    result = run("prepare.py", str(bad), f"--out={tmp_path}/b", check=False)
    assert result.returncode != 0 and f"{bad}:2: no string field 'text'" in result.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    result = run("prepare.py", str(empty), f"--out={tmp_path}/c", "--tokenizer=" + str(tmp_path), check=False)
    assert result.returncode != 0
    assert not any(os.path.exists(tmp_path / name) for name in ("a", "b", "c"))  # no dataset that looks complete


def test_vocab_size_above_the_datasets_trains_and_below_is_refused(demo_data, tmp_path):
    # larger: room for tokens added later (GPT-2's 50,257 over a smaller tokenizer's ids, as the GPU check does)
    args = [*TINY_MODEL, f"--data_dir={demo_data}", "--max_iters=2", "--micro_batch_size=2", "--batch_size=2",
            "--eval_iters=1"]
    run("train.py", *args, f"--out_dir={tmp_path}/larger", "--vocab_size=2000")
    from infra.checkpoint import load_checkpoint
    assert load_checkpoint(str(tmp_path / "larger"))["model"]["lm_head.weight"].shape[0] == 2048  # padded to 128
    result = run("train.py", *args, f"--out_dir={tmp_path}/smaller", "--vocab_size=1000", check=False)
    assert result.returncode != 0 and "vocab_size=1000 is smaller than the dataset's vocabulary (1024)" in result.stderr
