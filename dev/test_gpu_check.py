"""gpu_check.py's dry run on the CPU: every part runs and reports (the real check needs a GPU)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    result = subprocess.run([sys.executable, "dev/gpu_check.py", "--device=cpu", f"--out_file={tmp_path}/check.json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["matmul_tflops"] > 0 and report["copy_gb_per_s"] > 0 and report["sdpa_backend"] == "flash"
    assert report["smoke"]["ok"], report["smoke"]
    assert report["smoke"]["item_calls_between_logs"] == 0 and report["smoke"]["cuda_syncs_between_logs"] == 0
    assert any("flash" in op for op in report["smoke"]["attention_ops"])
    for name in ("1B", "124M"):
        for label in ("compiled", "eager"):
            run = report[name][label]
            assert run["tokens_per_s"] > 0 and run["muon_step_ms"] > 0 and 0 < run["data_share"] < 1
            assert 0 < run["muon_share_at_config_batch"] < run["muon_step_ms"] / run["ms_per_step"]
    assert "loop_overhead" in report["124M"]["compiled"]
    assert "GPU check: cpu (dry run)" in result.stdout
