"""What a user sees: the log line's throughput and ETA, timestamps, the config, progress in log
files, and Ctrl-C."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from infra.checkpoint import checkpoint_paths
from conftest import HANG_S, ROOT, metric_records as records, run_script as run

TINY = ["tests/tiny_model.py", "--micro_batch_size=4", "--batch_size=4", "--learning_rate=1e-2", "--warmup_iters=2"]




def test_throughput_around_evaluations_and_what_each_record_says(data, tmp_path):
    # a long evaluation (60 micro-batches) at step 29, inside the log interval of steps 21-30: the time
    # it takes must not count as training time, nor its exclusion shrink the interval to 1 step
    result = run(
        "train.py",
        *TINY,
        f"--data_dir={data}",
        f"--out_dir={tmp_path}",
        "--max_iters=40",
        "--log_interval=10",
        "--eval_interval=29",
        "--eval_iters=60",
    )
    ms = [r["ms_per_step"] for r in records(tmp_path) if "ms_per_step" in r]
    others = sorted(ms[:2] + ms[3:])
    assert others[1] / 2 < ms[2] < others[1] * 2, ms
    # every record has the wall-clock time; the log line the elapsed time and the ETA
    assert all(isinstance(r["time"], float) and abs(r["time"] - time.time()) < 600 for r in records(tmp_path))
    assert all(" elapsed, ETA " in line for line in result.stdout.splitlines() if line.startswith("step 40/40 |"))
    # the full config goes to out_dir/config.py (a config file) and metrics.jsonl; the console gets what differs
    config_py = (tmp_path / "config.py").read_text()
    assert (
        "beta2 = 0.95\n" in config_py
        and "eval_iters = 60\n" in config_py
        and records(tmp_path)[0]["config"]["beta2"] == 0.95
    )
    config_line = next(line for line in result.stdout.splitlines() if line.startswith("config"))
    assert "eval_iters=60" in config_line and "beta2" not in config_line


def test_ctrl_c_finishes_the_step_checkpoints_and_exits_cleanly(data, tmp_path):
    command = [sys.executable, "train.py", *TINY, f"--data_dir={data}", f"--out_dir={tmp_path}", "--max_iters=100000",
               "--eval_interval=100000", "--log_interval=1", "--eval_iters=1"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (tmp_path / "metrics.jsonl").exists() or len([r for r in records(tmp_path) if "loss" in r]) < 3:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    last_step = max(r["step"] for r in records(tmp_path) if "loss" in r)
    assert [os.path.basename(p) for p in checkpoint_paths(str(tmp_path))] == [f"ckpt_{last_step:07d}"]
    assert f"stopping at step {last_step} on a signal" in stdout and "got SIGINT" in stderr


@pytest.mark.slow
def test_one_large_text_file_is_cut_into_documents_and_the_split_checked_first(tmp_path):
    # a 3 MB "book": paragraphs, no file boundaries to split on
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "then", "sleeps", "well"]
    paragraphs = [" ".join(words[(i * 7 + j) % len(words)] for j in range(60 + i % 50)) + "." for i in range(9000)]
    book = tmp_path / "book.txt"
    book.write_text("\n\n".join(paragraphs) + "\n")
    result = run("prepare.py", str(book), f"--out={tmp_path}/ds", "--vocab_size=300", "--val_fraction=0.05",
                 "--progress_seconds=0")
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    documents = meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"]
    assert 250 < documents < 400 and meta["splits"]["val"]["documents"] > 3  # about 10,000 characters each
    # cut at blank lines: every document but the file's last ends a paragraph
    import numpy as np

    from data import read_shard
    import tokenizer as tok
    enc = tok.load_tokenizer(str(tmp_path / "ds"))
    text = enc.decode(
        np.concatenate([read_shard(str(tmp_path / "ds" / n)) for n in meta["splits"]["train"]["shards"]]).tolist()
    )
    pieces = text.split("<|endoftext|>")[1:]
    assert all(p.endswith(".\n\n") for p in pieces[:-1]) and max(map(len, pieces)) <= 10_000
    # progress shows in a log file too (stderr is not a terminal here), and the tokenizer's training is announced
    assert "training a BPE tokenizer" in result.stderr and "trained a BPE tokenizer" in result.stderr
    assert "tokenizing: " in result.stderr and "reading the tokenizer's training text: " in result.stderr
    # a split that would be empty fails before any tokenizer is trained
    result = run("prepare.py", str(book), f"--out={tmp_path}/bad", "--vocab_size=300", "--val_fraction=0.0001",
                 "--text_document_chars=10000000", check=False)
    assert result.returncode != 0 and "no documents in the val split (1 in all)" in result.stderr
    assert "training a BPE" not in result.stderr and not (tmp_path / "bad").exists()


SCRIPTS = [
    "train.py",
    "prepare.py",
    "sample.py",
    "export_hf.py",
    "bench.py",
    "evaluate.py",
    "convert_tasks.py",
    "report.py",
]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_answers_before_torch_is_imported(script):
    result = subprocess.run([sys.executable, "-X", "importtime", script, "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "Settings (config files and --key=value):" in result.stdout, result.stderr[-2000:]
    imported = {
        line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")
    }
    assert "torch" not in imported and "--print_config" in result.stdout
    if script == "evaluate.py":  # quoted defaults with newlines in them are shown escaped
        assert 'joined by "\\n\\n"' in result.stdout and 'stop ["\\n\\n"]' in result.stdout


def test_settings_show_as_a_user_writes_them():
    result = run("train.py", "configs/pretrain.py", "configs/tiny.py", "--print_config")
    assert "learning_rate = 0.003\n" in result.stdout and "0.0029999" not in result.stdout
    help_text = run("train.py", "--help").stdout
    assert "--print_config" in help_text and "--init_from_unfinished=False" in help_text


def test_tiny_val_splits_are_warned_about(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(40):
        (docs / f"{i}.md").write_text(f"# Note {i}\n\n" + "Some words about the topic at hand. " * 20)
    # named docs/<i>.md (run from tmp_path): the split, a hash of the names, is the same on every run
    prepared = run(os.path.join(ROOT, "prepare.py"), "docs", f"--out={tmp_path}/notes", "--tokenizer=bytes",
                   "--val_fraction=0.1", cwd=tmp_path)
    assert "warning: the val split of" in prepared.stderr and "(now --val_fraction=0.1)" in prepared.stderr
    # the warning names the fraction that would do: with it, no warning
    fraction = re.search(r"prepare the data again with --val_fraction=([0-9.]+)", prepared.stderr).group(1)
    again = run(os.path.join(ROOT, "prepare.py"), "docs", f"--out={tmp_path}/notes2", "--tokenizer=bytes",
                f"--val_fraction={fraction}", cwd=tmp_path)
    assert "warning" not in again.stderr, again.stderr
    trained = run("train.py", *TINY, f"--data_dir={tmp_path}/notes", f"--out_dir={tmp_path}/out", "--max_iters=1",
                  "--eval_iters=200", "--block_size=64")  # 51,200 tokens an evaluation could read
    # half the 51,200 is most of the corpus: more data, or the eval_iters its val split holds
    assert "a val loss on so few is noisy" in trained.stdout and "is too small to hold 25,600 out" in trained.stdout
    assert "or evaluate less: --eval_iters=22" in trained.stdout  # 2 x 2,926 val tokens / 256 per eval iter
    # the demo's tasks are scored only on the demo's data
    printed = run(
        "train.py", "configs/pretrain.py", "configs/tiny.py", f"--data_dir={tmp_path}/notes", "--print_config"
    )
    assert "eval_tasks = {}" in printed.stdout


@pytest.mark.slow
def test_without_a_compiler_training_runs_uncompiled_and_says_so(data, tmp_path):
    # torch.compile builds C++ (CPU) or C (Triton, CUDA) at run time: a machine without a compiler
    # trains uncompiled with one warning, where it would die at the first step inside inductor
    bare = {"PATH": os.path.dirname(sys.executable), "CXX": "", "CC": ""}
    result = subprocess.run([sys.executable, "train.py", *TINY, f"--data_dir={data}", f"--out_dir={tmp_path}",
                             "--max_iters=2", "--eval_interval=2", "--compile=True"], cwd=ROOT, capture_output=True,
                            text=True, timeout=HANG_S, env={**os.environ, **bare, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: compile=True needs a C++ compiler" in result.stdout and "training uncompiled" in result.stdout
    assert records(tmp_path)[0]["run"]["compile"] is False and checkpoint_paths(str(tmp_path))


def test_a_busy_cpu_is_named_with_the_threads_that_would_help(monkeypatch):
    from infra.device import busy_cpu_warning
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert "load average is 1.8 on 2 cores" in busy_cpu_warning(load=1.8, cores=2, threads=2)
    assert "OMP_NUM_THREADS=1" in busy_cpu_warning(load=1.8, cores=2, threads=2)
    assert "OMP_NUM_THREADS=3" in busy_cpu_warning(load=5.2, cores=8, threads=8)
    assert busy_cpu_warning(load=0.3, cores=2, threads=2) is None  # idle cores: nothing to say
    assert busy_cpu_warning(load=1.8, cores=2, threads=1) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user chose
    assert busy_cpu_warning(load=1.8, cores=2, threads=2) is None
