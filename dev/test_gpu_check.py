"""gpu_check.py's dry run on the CPU: every part runs and reports, with no rustbpe and no prepared data,
and a check that is killed or runs out of time keeps what it measured (the real check needs a GPU)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import HANG_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ["toolchain", "ceilings", "attention", "smoke", "1B as configured", "1B with Muon", "1B levers",
         "1B at 80 GB", "1B under DDP", "1B under FSDP2", "124M", "DDP with 25 MB buckets"]


def environment(tmp_path):
    """As on the GPU machine: rustbpe cannot be imported (a stand-in module that refuses), in this
    process and every one it starts."""
    (tmp_path / "no_rustbpe").mkdir(exist_ok=True)
    (tmp_path / "no_rustbpe" / "rustbpe.py").write_text("raise ImportError('rustbpe is not installed here')\n")
    return {**os.environ, "PYTHONPATH": str(tmp_path / "no_rustbpe"), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_gpu_check_dry_run_without_rustbpe(tmp_path):
    result = subprocess.run([sys.executable, "dev/gpu_check.py", "--device=cpu", f"--out_file={tmp_path}/check.json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=HANG_S, env=environment(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "check.json").read_text())
    parts = report["parts"]
    assert list(parts) == PARTS and not [
        name for name, part in parts.items() if "error" in part or "skipped" in part
    ], parts
    for name in PARTS:  # each part printed its lines as it ended
        assert f"] {name}: " in result.stdout
    assert parts["toolchain"]["compiler_problem"] is None and parts["toolchain"]["cxx"]  # this machine has g++
    assert parts["ceilings"]["matmul_tflops"] > 0 and parts["ceilings"]["copy_gb_per_s"] > 0
    for name in ("1B as configured", "1B under DDP", "1B under FSDP2"):
        assert parts[name]["ms_per_step"] > 0 and parts[name]["checkpoint_pause_s"] is not None
    assert (
        parts["124M"]["tokens_per_s"] > 0 and "loop_overhead" in parts["124M"] and 0 < parts["124M"]["data_share"] < 1
    )
    assert 0 < parts["1B with Muon"]["muon_share"] < 1 and parts["1B under DDP"]["ddp_cost"] is not None
    assert 0 < parts["1B with Muon"]["muon_share_8_gpus"] <= parts["1B with Muon"]["muon_share"]
    assert parts["1B under FSDP2"]["fsdp_cost"] is not None
    assert (
        parts["attention"]["FLASH_ATTENTION/gqa"]["tflops"] > 0
        and parts["attention"]["FLASH_ATTENTION/expanded"]["tflops"] > 0
    )
    assert "error" in parts["attention"]["CUDNN_ATTENTION/gqa"]  # no cuDNN on the CPU: reported, not fatal
    # fp32 on the CPU: the flash kernel's output and gradients equal the math backend's to rounding
    errors = parts["attention"]["FLASH_ATTENTION/gqa"]["error_vs_math_fp32"]
    assert set(errors) == {"out", "dq", "dk", "dv"} and max(errors.values()) < 1e-4, errors
    assert "this budget reaches" in result.stdout
    smoke = parts["smoke"]
    assert smoke["ok"] and smoke["item_calls_between_logs"] == 0 and smoke["cuda_syncs_between_logs"] == 0
    assert any("flash" in op for op in smoke["attention_ops"])
    assert parts["1B at 80 GB"]["micro_batch_size"] == 8
    assert set(parts["ceilings"]["fused_speedup"]) == {"qkv", "gate_up"}
    assert parts["attention"]["FLASH_ATTENTION/gqa_head_dim_128"]["tflops"] > 0
    for lever in ("fp8", "unchunked_loss"):
        assert parts["1B levers"][lever]["ms_per_step"] > 0 and parts["1B levers"][lever]["speedup"] is not None
    assert parts["DDP with 25 MB buckets"]["against_250_mb"] is not None


@pytest.mark.slow
def test_a_killed_or_late_check_keeps_what_it_measured(tmp_path):
    out = tmp_path / "check.json"
    process = subprocess.Popen([sys.executable, "dev/gpu_check.py", "--device=cpu", f"--out_file={out}"], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment(tmp_path))
    while process.poll() is None and not (out.exists() and len(json.loads(out.read_text())["parts"]) >= 3):
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed = json.loads(out.read_text())  # whole JSON, the parts done so far
    parts = killed["parts"]
    assert list(parts)[:3] == PARTS[:3] and parts["ceilings"]["matmul_tflops"] > 0
    # a deadline that leaves time for the first parts only: the rest are skipped and reported, the check ends
    # cleanly. It is set from the killed run's own timeline, as a slower machine takes longer to reach them.
    limit = 2 * killed["timeline_s"]["ceilings"] + 5
    result = subprocess.run(
        [sys.executable, "dev/gpu_check.py", "--device=cpu", f"--out_file={out}", f"--time_limit_s={limit}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HANG_S,
        env=environment(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    parts = json.loads(out.read_text())["parts"]
    assert list(parts) == PARTS and "matmul_tflops" in parts["ceilings"]
    assert "skipped" in parts[PARTS[-1]] and "out of time" in result.stdout


def test_the_check_never_replaces_a_file_it_did_not_write(tmp_path):
    theirs = tmp_path / "meta.json"  # a checkpoint's, say
    theirs.write_text('{"step": 4}')
    # (without the refusal, the check would run its parts to the deadline and write its results there)
    result = subprocess.run([sys.executable, "dev/gpu_check.py", "--device=cpu", f"--out_file={theirs}",
                             "--time_limit_s=20"], cwd=ROOT, capture_output=True, text=True, timeout=HANG_S,
                            env=environment(tmp_path))
    assert result.returncode != 0 and theirs.read_text() == '{"step": 4}'
    assert result.stderr.strip() == (f"gpu_check: {theirs} exists and is not a GPU check's results: refusing to "
                                     "replace it; choose another --out_file")


@pytest.mark.slow
@pytest.mark.compiled
def test_the_smoke_fails_when_compiled_gradients_are_wrong(tmp_path):
    # a stand-in torch.compile that zeroes every gradient (tests/bad_compile), in every process the check starts
    env = environment(tmp_path)
    env.update(GRAD_SCALE="0", PYTHONPATH=env["PYTHONPATH"] + os.pathsep + os.path.join(ROOT, "tests", "bad_compile"))
    result = subprocess.run([sys.executable, "dev/gpu_check.py", "--device=cpu", f"--out_file={tmp_path}/check.json",
                             "--only=toolchain,smoke,1B as configured"], cwd=ROOT, capture_output=True, text=True,
                            timeout=HANG_S, env=env)
    assert result.returncode == 1 and "FAILED: smoke" in result.stdout, result.stdout[-3000:]
    parts = json.loads((tmp_path / "check.json").read_text())["parts"]
    assert "compiled and uncompiled training disagree" in parts["smoke"]["error"]
    assert parts["1B as configured"] == {"skipped": "the smoke failed: compiled training does not learn here"}
    assert parts["ceilings"] == {"skipped": "not asked for (--only)"} and "error" not in parts["toolchain"]
