import json
import os
import re
import subprocess
import sys

import pytest
import torch

from infra.checkpoint import load_checkpoint
from conftest import HANG_S
from muon import Muon, newton_schulz, update_scale

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def with_spectrum(m, n, smallest, seed):
    """An m x n matrix whose singular values are log-spaced from 7 down to 7 * smallest."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    return (U * torch.logspace(0, torch.log10(torch.tensor(smallest)).item(), k)) @ V.T * 7.0


@pytest.mark.parametrize("shape", [(64, 64), (32, 128), (128, 32), (4, 96, 96)])
def test_newton_schulz_singular_values_in_band(shape):
    # stated band: singular values within a factor 100 of the largest end in [0.65, 1.25]
    G = torch.stack([with_spectrum(*shape[-2:], 1e-2, seed) for seed in range(shape[0] if len(shape) == 3 else 1)])
    out = newton_schulz(G if len(shape) == 3 else G[0])
    assert out.dtype == torch.bfloat16 and out.shape == torch.Size(shape)
    singular_values = torch.linalg.svdvals(out.float())
    assert singular_values.min() > 0.65 and singular_values.max() < 1.25
    # and it keeps the input's singular vectors: U^T out V is (nearly) diagonal
    U, _, Vh = torch.linalg.svd(G.double() if len(shape) == 3 else G[0].double(), full_matrices=False)
    core = U.mT @ out.double() @ Vh.mT
    off_diagonal = core - torch.diag_embed(torch.diagonal(core, dim1=-2, dim2=-1))
    assert off_diagonal.norm() < 0.05 * core.norm()


def reference_muon(params, grads_per_step, lr, weight_decay, momentum):
    """The same math in float64, one matrix at a time."""
    a, b, c = 3.4445, -4.7750, 2.0315
    params = [p.double().clone() for p in params]
    buffers = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for p, buf, g in zip(params, buffers, grads):
            g = g.double()
            buf.mul_(momentum).add_(g, alpha=1 - momentum)
            X = (1 - momentum) * g + momentum * buf  # Nesterov
            transposed = X.shape[0] > X.shape[1]
            X = X.T if transposed else X
            X = X / X.norm()
            for _ in range(5):
                A = X @ X.T
                X = a * X + (b * A + c * A @ A) @ X
            X = X.T if transposed else X
            p.mul_(1 - lr * weight_decay).sub_(lr * update_scale(p.shape) * X)
    return params


def test_muon_steps_match_float64_reference():
    torch.manual_seed(0)
    shapes = [(32, 32), (32, 32), (16, 48), (48, 16)]
    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    start = [p.detach().clone() for p in params]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    optimizer = Muon(params, lr=0.01, weight_decay=0.1, momentum=0.95)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g
        optimizer.step()
    expected = reference_muon(start, grads, lr=0.01, weight_decay=0.1, momentum=0.95)
    for p, e, s in zip(params, expected, start):
        # bf16 tolerance: within 5% of the whole change the three steps made (measured: 2-2.5%)
        change = (e - s.double()).norm()
        assert change > 0.01 and (p.double() - e).norm() < 0.05 * change


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp", "fsdp neuron_norm"])
def test_sharded_muon_matches_single_process(tmp_path, mode):
    mode = mode.split()
    subprocess.run([sys.executable, "tests/muon_sharded.py", str(tmp_path / "single"), *mode], cwd=ROOT, check=True)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "tests/muon_sharded.py", str(tmp_path / "sharded"), *mode], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=HANG_S)
    assert result.returncode == 0, result.stderr
    # each rank keeps the momentum of part of the matrices (ddp: whole ones, fsdp: its rows of each)
    kept = [(int(k), int(n)) for k, n in re.findall(r"momentum elements kept (\d+) of (\d+)", result.stdout)]
    assert len(kept) == 2 and sum(k for k, _ in kept) == kept[0][1] and all(0 < k < n for k, n in kept), result.stdout
    a, b = load_checkpoint(str(tmp_path / "single")), load_checkpoint(str(tmp_path / "sharded"))
    assert len(a["model"]) == len(b["model"]) and len(a["optimizers"]["muon"]) == 3 * 7
    for name in a["model"]:
        # the same bf16 matmuls on the same matrices, batched differently: equal to fp32 rounding
        torch.testing.assert_close(a["model"][name], b["model"][name], rtol=1e-5, atol=1e-6)
    for name, state in a["optimizers"]["muon"].items():
        assert set(state) == ({"momentum_buffer", "second_moment"} if "neuron_norm" in mode else {"momentum_buffer"})
        for key in state:  # NorMuon's state is kept by each matrix's owner, whole, not by rows
            torch.testing.assert_close(state[key], b["optimizers"]["muon"][name][key])


def test_use_muon_trains_the_tiny_model(data, tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--use_muon=True", f"--data_dir={data}",
                             f"--out_dir={tmp_path}/out", "tests/tiny_model.py", "--micro_batch_size=16",
                             "--batch_size=32", "--max_iters=40", "--warmup_iters=4", "--learning_rate=1e-2",
                             "--eval_interval=40", "--eval_iters=4", "--log_interval=1"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Muon: 14 tensors" in result.stdout
    with open(f"{tmp_path}/out/metrics.jsonl") as f:
        losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    assert losses[0] > 6.0 and losses[-1] < losses[0] - 1.5


def test_found_inf_skips_the_step_without_touching_the_state():
    torch.manual_seed(0)
    shapes = [(32, 32), (32, 32), (16, 48)]
    runs = []
    for flags in ([None, None, None], [0.0, 1.0, 0.0]):  # the second run's middle step is bad
        params = [torch.nn.Parameter(torch.ones(s) * 0.1) for s in shapes]
        optimizer = Muon(params, lr=0.01, weight_decay=0.1, momentum=0.95)
        torch.manual_seed(1)
        for flag in flags:
            grads = [torch.randn(s) for s in shapes]
            if flag:  # a bad step's gradients: NaN and inf, the first step's state must survive them
                grads = [g.fill_(float("nan")) if i % 2 else g.fill_(float("inf")) for i, g in enumerate(grads)]
                before = [p.detach().clone() for p in params] + [
                    optimizer.state[p]["momentum_buffer"].clone() for p in params
                ]
            for p, g in zip(params, grads):
                p.grad = g
            optimizer.found_inf = None if flag is None else torch.tensor(flag)
            optimizer.step()
            if flag:
                after = [p.detach() for p in params] + [optimizer.state[p]["momentum_buffer"] for p in params]
                assert all(torch.equal(a, b) for a, b in zip(after, before))
        runs.append([p.detach().clone() for p in params])
    # the guarded run skipped one step of three: it differs from the unguarded run, finitely
    assert all(torch.isfinite(p).all() for p in runs[1])
    assert not all(torch.equal(a, b) for a, b in zip(*runs))


def test_found_inf_zero_is_the_plain_step():
    shapes = [(32, 32), (16, 48)]
    results = []
    for found_inf in (None, torch.tensor(0.0)):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        optimizer = Muon(params, lr=0.01, weight_decay=0.1)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape)
            optimizer.found_inf = found_inf
            optimizer.step()
        results.append(params)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_the_update_is_one_add_per_group_in_the_weights_dtype(monkeypatch):
    # a foreach add over mixed dtypes (fp32 weights, bf16 updates) falls back on CUDA to one kernel
    # per matrix: the updates are cast once, and every group's matrices take one add
    adds, real_add = [], torch._foreach_add_

    def add(tensors, others, *args, **kwargs):
        adds.append(
            ({t.dtype for t in tensors}, {o.dtype for o in others} if isinstance(others, (list, tuple)) else None)
        )
        return real_add(tensors, others, *args, **kwargs)
    monkeypatch.setattr(torch, "_foreach_add_", add)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(32, 32), (32, 32), (16, 48)]]  # two groups of shapes
    optimizer = Muon(params, lr=0.01)
    for p in params:
        p.grad = torch.randn(p.shape)
    optimizer.step()
    assert len(adds) == 2 and all(
        weights == {torch.float32} and updates == {torch.float32} for weights, updates in adds
    )
