"""Fixtures shared by every test: the demo data, built once per session, and GPT-2's tokenizer offline."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.abspath(__file__))
# GPT-2's BPE ranks (tiktoken's r50k_base file), for the tests that need the real GPT-2 tokenizer offline
GPT2_RANKS = os.environ.get("GPT2_TIKTOKEN") or os.path.join(ROOT, "..", "shared", "tokenizers", "gpt2.tiktoken")


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """The demo datasets with a 512-token vocabulary, built once: DIR (text) and DIR-chat."""
    out = str(tmp_path_factory.mktemp("data") / "demo")
    subprocess.run([sys.executable, "prepare.py", f"--out={out}", "--vocab_size=512"], cwd=ROOT, check=True,
                   capture_output=True)
    return out


# train.py on the tests' model (tests/tiny_model.py), one evaluation window and a log line per step
TINY_RUN = ["tests/tiny_model.py", "--eval_iters=1", "--log_interval=1", "--micro_batch_size=4", "--batch_size=4",
            "--learning_rate=1e-2", "--warmup_iters=2"]


@pytest.fixture(scope="session")
def finished(data, tmp_path_factory):
    """A finished run of TINY_RUN (max_iters=8, checkpoints at steps 4 and 8) and its Hugging Face
    export in RUN/hf: copy it before changing anything in it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run_script("train.py", *TINY_RUN, f"--data_dir={data}", f"--out_dir={out}", "--max_iters=8", "--eval_interval=4")
    run_script("export_hf.py", f"--ckpt={out}", f"--hf_dir={out}/hf")
    return out


@pytest.fixture(scope="session")
def other_data(tmp_path_factory):
    """A small text dataset with another tokenizer than data's: a BPE of the same size (512 tokens) trained
    on other documents, so the two differ only in their merges."""
    out = str(tmp_path_factory.mktemp("other") / "other")
    subprocess.run([sys.executable, "prepare.py", f"--out={out}", "--vocab_size=512", "--max_docs=200"], cwd=ROOT,
                   check=True, capture_output=True)
    return out


@pytest.fixture
def gpt2(tmp_path, monkeypatch):
    """tokenizer.from_tiktoken_name('gpt2') with no network: tiktoken finds the rank file in its cache."""
    if not os.path.exists(GPT2_RANKS):
        pytest.skip("GPT-2's BPE rank file is not here to run offline: set GPT2_TIKTOKEN to a copy of "
                    "tiktoken's r50k_base.tiktoken")
    import tokenizer as tok
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    url = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"  # cached under its sha1
    shutil.copy(GPT2_RANKS, cache / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    return tok.from_tiktoken_name("gpt2")


def checkpoint_meta(model, step, encoder=None, **extra):
    """The metadata train.py writes with a checkpoint, for tests that save one of their own model."""
    from infra.resume import training_meta
    import tokenizer as tok
    return {**training_meta(step=step, tokens_seen=0, batch_size=0, model_args=vars(model.args), config={},
                            tokenizer=tok.tokenizer_state(encoder or tok.byte_tokenizer()), data_dir="", parent=None),
            **extra}


HANG_S = 1800  # a subprocess's timeout guards against a hang, never against slowness: a loaded machine is slow
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")


def run_script(script, *args, launcher=(sys.executable,), env=None, check=True, timeout=HANG_S, cwd=ROOT):
    """A repository script run as a user would, one thread per process (the tests share two cores)."""
    result = subprocess.run([*launcher, script, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check:
        assert result.returncode == 0, (
            f"{script} exited {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        )
    return result


def train(*args, script="train.py", **kwargs):
    """train.py (or a script that wraps it) with args; run_script's keywords."""
    return run_script(script, *args, **kwargs)


def metric_records(out_dir):
    """Every metrics.jsonl record of a run, in order (each line whole: a torn one would not parse)."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def records(out_dir, key="loss"):
    """{step: value} of the metrics.jsonl records that hold key."""
    return {r["step"]: r[key] for r in metric_records(out_dir) if key in r}


def state_tensors(checkpoint):
    """Every tensor of a loaded checkpoint by name: the weights, and each optimizer's state by parameter."""
    return {**{f"model/{name}": t for name, t in checkpoint["model"].items()},
            **{f"{kind}/{name}/{key}": t for kind, state in checkpoint["optimizers"].items()
               for name, entry in state.items() for key, t in entry.items()}}


def assert_same_state(a, b, exact=True):
    """Two loaded checkpoints hold the same tensors: bit for bit, or to fp32 summation order."""
    import torch
    tensors_a, tensors_b = state_tensors(a), state_tensors(b)
    assert tensors_a.keys() == tensors_b.keys()
    for key in tensors_a:
        if exact:
            assert torch.equal(tensors_a[key], tensors_b[key]), key
        else:  # fp32 summed in another order (another world size or mode)
            torch.testing.assert_close(tensors_a[key], tensors_b[key], rtol=1e-4, atol=1e-5, msg=key)


def rewrite_checkpoint_file(path, tensors):
    """A checkpoint's safetensors file rewritten with tensors, its sha256 in meta.json updated to match:
    what training itself would have written (NaN weights, say), not bytes damaged on disk."""
    from safetensors.torch import save_file
    save_file(tensors, str(path))
    meta_path = os.path.join(os.path.dirname(path), "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    with open(path, "rb") as f:
        meta["files"][os.path.basename(path)]["sha256"] = hashlib.sha256(f.read()).hexdigest()
    with open(meta_path, "w") as f:
        json.dump(meta, f)


def one_line_error(result):
    """The one line a refused command prints (no traceback), after checking it exited non-zero."""
    assert result.returncode != 0, result.stdout[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


def snapshot(directory):
    """{relative path: bytes} of every file under a directory: equal snapshots, nothing touched."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                with open(path, "rb") as f:
                    files[os.path.relpath(path, directory)] = f.read()
    return files
