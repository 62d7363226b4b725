"""Data-parallel training with torchrun and gloo on the CPU: equivalent to one process, and no hangs."""
import time

import pytest
import torch

from conftest import TORCHRUN, records, run_script

TINY = ["tests/tiny_model.py", "--eval_iters=2", "--log_interval=1", "--micro_batch_size=4", "--batch_size=8",
        "--learning_rate=1e-2", "--warmup_iters=2"]




def final_parameters(out_dir):
    from checkpoint import load_checkpoint
    return load_checkpoint(out_dir)["model"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant", [[], ["--use_muon=True", "--muon_lr=1e-2"], ["chat"]], ids=["adamw", "muon", "masked"]
)
def test_two_processes_match_one(data, tmp_path, variant):
    if variant == ["chat"]:  # the loss is normalised by the learned targets of all micro-batches and ranks
        variant = [f"--data_dir={data}-chat", "--use_loss_mask=True"]
    # evaluation: 3 micro-batches of 4 windows in all, whatever the world size (2 ranks: 6 windows each, padded to 8);
    # the tasks' examples split between ranks (5 generative ones: 3 and 2, the second rank running a padding example)
    tasks = "--eval_tasks={'%s-tasks/next_line.jsonl': 6, '%s-tasks/identifier.jsonl': 5}" % (data, data)
    args = [*TINY, f"--data_dir={data}", *variant, "--max_iters=5", "--eval_interval=5", "--eval_iters=3", tasks]
    run_script("train.py", *args, f"--out_dir={tmp_path}/one")
    two = run_script("train.py", *args, f"--out_dir={tmp_path}/two", launcher=TORCHRUN)
    assert "world size 2" in two.stdout
    assert records(f"{tmp_path}/one") == pytest.approx(records(f"{tmp_path}/two"), rel=1e-5)
    assert records(f"{tmp_path}/one", "val_loss") == pytest.approx(records(f"{tmp_path}/two", "val_loss"), rel=1e-6)
    one_tasks, two_tasks = (list(records(f"{tmp_path}/{run}", "tasks").values()) for run in ("one", "two"))
    assert (
        len(one_tasks) == 2
        and one_tasks[-1]["identifier"]["examples"] == 5
        and one_tasks[-1]["next_line"]["examples"] == 6
    )
    for a, b in zip(one_tasks, two_tasks):
        assert a.keys() == b.keys() and all(a[name] == pytest.approx(b[name]) for name in a)
    a, b = final_parameters(f"{tmp_path}/one"), final_parameters(f"{tmp_path}/two")
    assert a.keys() == b.keys() and not any(k.startswith(("module.", "_orig_mod.")) for k in a)
    for key in a:  # fp32, summed in another order: equal to rounding
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


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


def test_batch_that_does_not_divide_across_ranks_is_refused(data, tmp_path):
    result = run_script("train.py", *TINY, f"--data_dir={data}", f"--out_dir={tmp_path}", "--batch_size=12",
                        launcher=TORCHRUN, check=False)
    assert result.returncode != 0
    assert (
        "batch size 12 is not a multiple of micro_batch_size x world_size = 4 x 2 = 8; use e.g. 8 or 16"
        in result.stderr
    )


def test_an_exception_on_one_rank_ends_the_run_without_hanging(data, tmp_path):
    started = time.time()
    result = run_script("tests/crash_rank.py", *TINY, f"--data_dir={data}", f"--out_dir={tmp_path}", "--max_iters=50",
                        "--eval_interval=1000", launcher=TORCHRUN, check=False, timeout=120)
    assert result.returncode != 0
    assert time.time() - started < 100
    assert "[rank1]" in result.stderr and "injected failure" in result.stderr  # torch names the rank of each line
