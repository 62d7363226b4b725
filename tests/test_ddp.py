"""Data-parallel training with torchrun and gloo on the CPU: equivalent to one process, and no hangs."""
import ast
import logging
import os
import time

import pytest
import torch

from conftest import TORCHRUN, records, run_script

TINY = ["tests/tiny_model.py", "--eval_iters=2", "--log_interval=1", "--micro_batch_size=4", "--batch_size=8",
        "--learning_rate=1e-2", "--warmup_iters=2"]


@pytest.mark.slow
def test_torchrun_wraps_in_ddp_even_one_rank(data, tmp_path):
    # the GPU check's DDP part runs one rank: the wrapper must be there for its cost to be measured
    one_rank = (*TORCHRUN[:-1], "--nproc_per_node=1")
    result = run_script("train.py", *TINY, f"--data_dir={data}", f"--out_dir={tmp_path}/one", "--max_iters=2",
                        "--eval_interval=2", launcher=one_rank)
    assert "world size 1, compile=False, DistributedDataParallel" in result.stdout
    plain = run_script("train.py", *TINY, f"--data_dir={data}", f"--out_dir={tmp_path}/plain", "--max_iters=2",
                       "--eval_interval=2")
    assert "world size 1, compile=False, GPT" in plain.stdout
    assert records(f"{tmp_path}/one") == records(f"{tmp_path}/plain")


def test_an_exception_on_one_rank_ends_the_run_without_hanging(data, tmp_path):
    started = time.time()
    result = run_script("tests/crash_rank.py", *TINY, f"--data_dir={data}", f"--out_dir={tmp_path}", "--max_iters=50",
                        "--eval_interval=1000", launcher=TORCHRUN, check=False, timeout=120)
    assert result.returncode != 0
    assert time.time() - started < 100
    assert "[rank1]" in result.stderr and "injected failure" in result.stderr  # torch names the rank of each line


@pytest.mark.slow
@pytest.mark.parametrize("crash", ["write", "disk_full"])
def test_a_rank_that_dies_or_fills_its_disk_in_a_checkpoint_write_ends_the_job_in_seconds(data, tmp_path, crash):
    """Rank 0 used to wait 30 s for the dead rank's part of the checkpoint, after its own training had
    already failed on the broken process group: the job now ends as soon as the launcher stops it."""
    started = time.time()
    result = run_script("tests/crash_rank.py", *TINY, f"--data_dir={data}", f"--out_dir={tmp_path}", "--max_iters=50",
                        "--eval_interval=4", launcher=TORCHRUN, env={"CRASH": crash}, check=False, timeout=120)
    assert result.returncode != 0 and time.time() - started < 20, time.time() - started
    assert "ckpt_0000004" not in os.listdir(tmp_path)  # (its .tmp goes at the next start)
    if crash == "disk_full":
        assert "error (rank 1): checkpoint at step 4 not written: OSError: [Errno 28] No space" in result.stderr


@pytest.mark.slow
def test_ranks_whose_launcher_is_killed_stop_with_a_checkpoint(data, tmp_path):
    """torchrun SIGKILLed cannot pass anything on: its ranks get a SIGHUP from the kernel (parent death
    signal) and stop as on any stop signal, with a checkpoint, instead of running on orphaned."""
    import signal
    import subprocess
    from conftest import ROOT
    if not os.path.isdir("/proc"):
        pytest.skip("needs Linux's /proc")
    process = subprocess.Popen([*TORCHRUN, "train.py", *TINY, f"--data_dir={data}", f"--out_dir={tmp_path}",
                                "--max_iters=100000", "--eval_interval=100000", "--log_interval=2"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in process.stdout:  # training has started on both ranks
        if line.startswith("step 4/"):
            break
    children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 2, children
    process.send_signal(signal.SIGKILL)
    process.wait()
    def running(pid):  # (a zombie waiting for init to reap it has ended)
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False
    deadline = time.time() + 30
    while time.time() < deadline and any(map(running, children)):
        time.sleep(0.2)
    orphaned = [pid for pid in children if running(pid)]
    for pid in orphaned:
        os.kill(int(pid), signal.SIGKILL)  # (they hold the output pipe open)
    rest = process.stdout.read()
    assert not orphaned, rest[-2000:]
    assert "stopping at step" in rest and any(p.startswith("ckpt_") for p in os.listdir(tmp_path)), rest[-2000:]


def compiled_graphs(monkeypatch, tmp_path, shape, ddp_bucket_mb):
    """How many graphs train.py's compiled DDP model is split into (one rank, gloo). Dynamo splits
    the graph at the buckets (DDPOptimizer) before any backend sees it: the eager backend counts them."""
    import torch.distributed as dist
    from model import GPT, ModelArgs
    from infra.parallel import wrap
    counts = []

    class Count(logging.Handler):
        def emit(self, record):
            if "DDPOptimizer used bucket cap" in record.getMessage():
                counts.append(record.args[1])

    logger, handler = logging.getLogger("torch._dynamo.backends.distributed"), Count()
    logger.addHandler(handler)
    monkeypatch.setattr(logger, "level", logging.INFO)
    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **options: compile(model, **{"backend": "eager", **options}))
    store = dist.FileStore(str(tmp_path / f"store-{ddp_bucket_mb}"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with torch.device("meta"):
            raw_model = GPT(ModelArgs(**shape))
        model, _ = wrap(raw_model, mode="ddp", device="cpu", local_rank=0, world_size=1, shard_size=1, compile=True,
                        bf16=False, reshard_after_forward=True, seed=0, ddp_bucket_mb=ddp_bucket_mb)
        x = torch.zeros(1, 8, dtype=torch.long)
        model(x, x, loss_reduction="sum").backward()
    finally:
        dist.destroy_process_group()
        logger.removeHandler(handler)
        torch._dynamo.reset()
    return counts[0]


@pytest.mark.slow
def test_compiled_ddp_is_about_one_graph_per_block(monkeypatch, tmp_path):
    # configs/pretrain.py's 1B layout with 3 of its 20 blocks; each block's fp32 gradients are 177 MB
    # (a small vocabulary: the embedding and the head are not what the buckets split)
    shape = dict(vocab_size=512, block_size=64, n_layer=3, n_head=32, n_kv_head=8, n_embd=2048, qk_norm=True)
    printed = run_script("train.py", "--print_config").stdout
    default = ast.literal_eval(next(line for line in printed.splitlines() if line.startswith("ddp_bucket_mb = "))[16:])
    graphs = {mb: compiled_graphs(monkeypatch, tmp_path, shape, mb) for mb in (25, default)}
    assert graphs[default] <= shape["n_layer"] + 2 < 3 * shape["n_layer"] < graphs[25]
