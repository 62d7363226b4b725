"""What keeps the GPU busy, checked on the CPU: no host syncs between log steps, no recompiles
when the batch-size schedule changes the accumulation or the model evaluates, activation
checkpointing's exact gradients."""
import json
import os
import subprocess
import sys

import pytest

from conftest import HANG_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["tests/tiny_model.py", "--n_layer=1", "--n_head=2", "--n_kv_head=1", "--n_embd=32", "--block_size=32",
         "--micro_batch_size=4", "--eval_iters=2"]


def profile(*args):
    """bench.py --profile=True: train.py's steps 8-10 under the profiler."""
    result = subprocess.run(
        [sys.executable, "bench.py", *SMALL, "--profile=True", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HANG_S,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("setup", ["adamw", "muon_chat"])
def test_no_host_sync_between_log_steps(data, tmp_path, setup):
    # steps 8-10 are profiled; logs, evals and checkpoints only at step 12
    extra = ["--use_muon=True", f"--data_dir={data}-chat", "--use_loss_mask=True"] if setup == "muon_chat" \
        else [f"--data_dir={data}"]
    profile(*extra, f"--profile_dir={tmp_path}/run", "--batch_size=8", "--max_iters=12", "--log_interval=12",
            "--eval_interval=12")
    with open(f"{tmp_path}/run/summary.json") as f:
        summary = json.load(f)
    assert summary["steps"] == [8, 9, 10]
    assert summary["item_calls"] == 0 and summary["cuda_syncs"] == 0
    assert any("flash" in op for op in summary["attention_ops"]), summary  # SDPA's fused kernel, GQA included
    # the count does see syncs: a log step inside the profiled window brings its .item() calls
    profile(*extra, f"--profile_dir={tmp_path}/logged", "--batch_size=8", "--max_iters=12", "--log_interval=3",
            "--eval_interval=12")
    with open(f"{tmp_path}/logged/summary.json") as f:
        assert json.load(f)["item_calls"] >= 3  # loss, grad norm, the divergence counters at step 9


@pytest.mark.slow
@pytest.mark.parametrize("ranks,mode", [(1, "ddp"), (2, "ddp"), (2, "fsdp")])
def test_batch_size_schedule_does_not_recompile(data, tmp_path, ranks, mode):
    # accumulation goes 1 -> 2 -> 4 micro-batches; the micro-batch, so every compiled shape, stays the same,
    # and evaluation runs the model uncompiled: one compilation per rank, and no recompile.
    # Two ranks: torch.compile inside DDP, with Muon, as on 8 GPUs; or each block compiled under FSDP2
    # (one graph for all the blocks, and evaluation uncompiled although the blocks are compiled in place).
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] \
        if ranks > 1 else [sys.executable]
    result = subprocess.run([*launcher, "train.py", *SMALL, f"--data_dir={data}", f"--out_dir={tmp_path}/run",
                             "--compile=True", "--max_iters=12", "--eval_interval=6", "--log_interval=3",
                             *(["--use_muon=True"] if ranks > 1 else []), f"--data_parallel={mode}", "--n_layer=2",
                             "--batch_size_schedule={'strategy': 'doubling', 'start_batch_size': %d, "
                             "'interval_steps': 4, 'max_batch_size': %d}" % (4 * ranks, 16 * ranks)],
                            cwd=ROOT, capture_output=True, text=True, timeout=HANG_S,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "TORCH_LOGS": "dynamo,recompiles"})
    assert result.returncode == 0, result.stderr[-3000:]
    with open(f"{tmp_path}/run/metrics.jsonl") as f:
        assert [r["grad_accum"] for r in map(json.loads, f) if "grad_accum" in r] == [1, 2, 4, 4]
    # dynamo logs each compilation it starts: exactly one per rank (so the log is known to reach this test)
    compilations = [line for line in result.stderr.splitlines() if "torchdynamo start tracing forward" in line]
    assert len(compilations) == ranks and "Recompiling function" not in result.stderr, result.stderr[-3000:]


def test_activation_checkpointing_same_gradients_less_saved_memory():
    import torch

    from model import GPT, ModelArgs

    def run(checkpoint_blocks):
        torch.manual_seed(0)
        model = GPT(ModelArgs(vocab_size=256, block_size=64, n_layer=4, n_head=4, n_kv_head=2, n_embd=64))
        model.checkpoint_blocks = checkpoint_blocks
        x = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1))
        saved_bytes = []  # what autograd keeps for the backward pass: the activation memory

        def pack(tensor):
            saved_bytes.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(x, x.roll(-1, 1))
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters()}, sum(saved_bytes)

    loss, grads, saved = run(False)
    loss_ckpt, grads_ckpt, saved_ckpt = run(True)
    assert loss == loss_ckpt
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=0, atol=1e-7)
    # the blocks' inputs stay; everything inside the blocks is recomputed (logits and head remain)
    assert saved_ckpt < 0.5 * saved, (saved_ckpt, saved)
