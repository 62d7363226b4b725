"""Compiled training is checked against uncompiled training, on whichever torch runs the suite (CI runs
each end of requirements.txt's range): the compiled gradients equal the eager ones, a compiled run's
losses follow the uncompiled run's in every mode, and the start-up check stops a run whose compiler
changes the gradients (tests/bad_compile/sitecustomize.py stands in for such a compiler)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from infra.checkpoint import checkpoint_paths
from conftest import HANG_S, ROOT, TORCHRUN, one_line_error, run_script
from fp8 import use_fp8
from model import GPT, ModelArgs

pytestmark = pytest.mark.compiled


def gradients(compiled, backend, **settings):
    torch.manual_seed(0)
    model = GPT(ModelArgs(vocab_size=100, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32))
    for name, value in settings.items():
        setattr(model, name, value)
    if settings.get("fp8"):
        use_fp8(model)
    forward = torch.compile(model, backend=backend) if compiled else model
    idx = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(1))
    loss = forward(idx, idx.roll(-1, 1), loss_reduction="sum")
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("settings", [
    {"loss_chunk_tokens": 16},  # the default path: torch 2.11 compiled its gradients to zeros
    {"loss_chunk_tokens": 0},
    {"loss_chunk_tokens": 16, "checkpoint_blocks": True, "document_token": 3, "fp8": True},
], ids=["chunked", "unchunked", "chunked-checkpointed-masked-fp8"])
def test_compiled_gradients_equal_eager_ones(backend, settings):
    eager_loss, eager = gradients(False, None, **settings)
    compiled_loss, compiled = gradients(True, backend, **settings)
    torch.testing.assert_close(compiled_loss, eager_loss)
    assert eager["lm_head.weight"].norm() > 0 and eager["layers.0.mlp.up_proj.weight"].norm() > 0
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-5, atol=1e-7, msg=name)


BAD_COMPILE = os.path.join(ROOT, "tests", "bad_compile")  # a stand-in torch.compile (GRAD_SCALE)
TINY = ["tests/tiny_model.py", "--micro_batch_size=4", "--batch_size=4", "--eval_iters=1", "--log_interval=1",
        "--max_iters=3", "--eval_interval=3", "--compile=True"]


@pytest.mark.slow
@pytest.mark.parametrize("scale", ["0", "0.5", "-1"])
def test_a_compiler_that_changes_gradients_stops_the_run_before_anything_is_written(data, tmp_path, scale):
    env = {"GRAD_SCALE": scale, "PYTHONPATH": BAD_COMPILE}
    result = run_script("train.py", *TINY, f"--data_dir={data}", f"--out_dir={tmp_path}/run", env=env,
                        check=False)
    line = one_line_error(result)
    assert "compiled and uncompiled training disagree with torch" in line and "--compile=False" in line, line
    assert torch.__version__ in line and not checkpoint_paths(f"{tmp_path}/run")
    assert "compiling the model, and checking it against the uncompiled one" in result.stdout  # no silent minute
    assert not os.path.exists(f"{tmp_path}/run/metrics.jsonl")
    if scale == "0":  # the same stand-in compiler stops bench.py before it times anything
        bench = run_script("bench.py", *TINY, f"--data_dir={data}", "--full_step=False", check=False, env=env)
        assert "disagree" in one_line_error(bench) and "bare step" not in bench.stdout


@pytest.mark.slow
def test_the_check_agrees_across_ranks_and_passes_a_faithful_compiler(data, tmp_path):
    # two ranks under DDP (the whole model compiled) and FSDP2 (each block): every rank stops on the same
    # line; GRAD_SCALE=1 (the stand-in compiles faithfully) trains
    args = [*TINY, f"--data_dir={data}", "--batch_size=8"]
    for mode in ("ddp", "fsdp"):
        wrong = run_script("train.py", *args, f"--out_dir={tmp_path}/{mode}", f"--data_parallel={mode}",
                           launcher=TORCHRUN, env={"GRAD_SCALE": "0", "PYTHONPATH": BAD_COMPILE}, check=False)
        assert wrong.returncode != 0 and "Traceback" not in wrong.stderr.split("elastic/multiprocessing")[0]
        assert all(f"error (rank {r}): compiled and uncompiled training disagree" in wrong.stderr for r in (0, 1))
        assert not checkpoint_paths(f"{tmp_path}/{mode}")
    run_script("train.py", *args, f"--out_dir={tmp_path}/right", launcher=TORCHRUN,
               env={"GRAD_SCALE": "1", "PYTHONPATH": BAD_COMPILE})
    assert checkpoint_paths(f"{tmp_path}/right")


SMALL = ["tests/tiny_model.py", "--n_layer=2", "--n_head=2", "--n_kv_head=1", "--n_embd=32", "--block_size=32",
         "--micro_batch_size=4", "--eval_iters=2", "--max_iters=12", "--eval_interval=6", "--log_interval=1",
         "--learning_rate=1e-2", "--muon_lr=1e-2", "--warmup_iters=2", "--use_muon=True", "--fp8=True",
         "--activation_checkpointing=True", "--document_masking=True"]


@pytest.mark.slow
@pytest.mark.parametrize("ranks,mode", [(1, "ddp"), (2, "ddp"), (2, "fsdp")])
def test_compiled_training_learns_as_uncompiled_and_never_recompiles(data, tmp_path, ranks, mode):
    # Muon, fp8, activation checkpointing and document masking, compiled with inductor as on a GPU: the
    # whole model inside DDP, or each block under FSDP2 (evaluation uncompiled, the blocks compiled in place).
    # Accumulation goes 1 -> 2 -> 4 micro-batches; the micro-batch, so every compiled shape, stays the
    # same: one compilation per rank, and no recompile.
    launcher = [*TORCHRUN[:-1], f"--nproc_per_node={ranks}"] if ranks > 1 else [sys.executable]
    args = [*SMALL, f"--data_dir={data}", f"--data_parallel={mode}",
            "--batch_size_schedule={'strategy': 'doubling', 'start_batch_size': %d, "
            "'interval_steps': 4, 'max_batch_size': %d}" % (4 * ranks, 16 * ranks)]
    losses = {}
    for compiled in (True, False):
        out = f"{tmp_path}/{compiled}"
        result = subprocess.run([*launcher, "train.py", *args, f"--out_dir={out}", f"--compile={compiled}"],
                                cwd=ROOT, capture_output=True, text=True, timeout=HANG_S,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "TORCH_LOGS": "dynamo,recompiles"})
        assert result.returncode == 0, result.stderr[-3000:]
        with open(f"{out}/metrics.jsonl") as f:
            metrics = [r for r in map(json.loads, f) if "grad_accum" in r]
        losses[compiled] = [r["loss"] for r in metrics]
        if compiled:
            assert [r["grad_accum"] for r in metrics] == [1] * 4 + [2] * 4 + [4] * 4
            # dynamo logs each compilation it starts: exactly one per rank (so the log is known to reach this test)
            compilations = [line for line in result.stderr.splitlines() if "torchdynamo start tracing forward" in line]
            assert len(compilations) == ranks and "Recompiling function" not in result.stderr, result.stderr[-3000:]
    assert losses[False][-1] < losses[False][0] - 0.3  # it learns, so a compiled run that does not would differ
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)
