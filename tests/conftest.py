import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
