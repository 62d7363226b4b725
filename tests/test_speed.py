"""What keeps the GPU busy, checked on the CPU: no host syncs between log steps, activation
checkpointing's exact gradients (no recompiles: tests/test_compiled.py)."""
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
