"""Fixtures shared by every test: the demo data, built once per session, and GPT-2's tokenizer offline."""
import hashlib
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


@pytest.fixture(scope="session")
def other_data(tmp_path_factory):
    """A small text dataset with another tokenizer than data's (a 600-token BPE)."""
    out = str(tmp_path_factory.mktemp("other") / "other")
    subprocess.run([sys.executable, "prepare.py", f"--out={out}", "--vocab_size=600", "--max_docs=200"], cwd=ROOT,
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
