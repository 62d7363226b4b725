"""The report reads right at stage boundaries: a stage starts on the token axis where the checkpoint
it started from was, each val curve says which data it is on, tasks with one chance level share one
labelled line, and a stage's wall time counts its runs, not the gaps between them."""
import json
import os
import runpy
import subprocess
import sys

import pytest

from conftest import ROOT


def write_stage(directory, runs, parent=None):
    """metrics.jsonl of a stage: runs is [(start time, steps, tokens per step, data_dir)], one per start."""
    os.makedirs(directory)
    with open(os.path.join(directory, "metrics.jsonl"), "w") as f:
        for n, (started, steps, per_step, data_dir) in enumerate(runs):
            run = {"parent": parent if n == 0 else f"{directory}/ckpt_x", "device": f"machine {n}", "params": 1e6}
            f.write(json.dumps({"config": {"data_dir": data_dir}, "run": run, "time": started}) + "\n")
            for step in steps:
                f.write(json.dumps({"step": step, "loss": 5.0 - step / 100, "tokens": step * per_step, "lr": 1e-3,
                                    "tokens_per_s": 1000.0, "time": started + step}) + "\n")
            f.write(json.dumps({"step": steps[-1], "val_loss": 4.0, "val_bpb": 1.0, "tokens": steps[-1] * per_step,
                                "tasks": {"a": {"acc": 0.3, "acc_norm": 0.35, "chance": 0.25, "examples": 10},
                                          "b": {"acc": 0.5, "acc_norm": 0.4, "chance": 0.25, "examples": 10}},
                                "time": started + steps[-1]}) + "\n")


@pytest.fixture
def report():
    sys.argv = ["report.py"]  # the module's settings read the command line
    return runpy.run_path(os.path.join(ROOT, "report.py"), run_name="report")


def test_stage_boundaries_wall_time_and_labels(tmp_path, report):
    pretrain, midtrain = str(tmp_path / "pretrain"), str(tmp_path / "midtrain")
    # pretrain ran to step 100 in two runs, an hour apart; midtrain started from its checkpoint at step 60
    write_stage(
        pretrain,
        [(1000.0, list(range(10, 70, 10)), 100, "data/web"), (5600.0, list(range(70, 110, 10)), 100, "data/web")],
    )
    write_stage(midtrain, [(9000.0, [10, 20], 50, "data/chat")], parent=f"{pretrain}/ckpt_0000060")
    stages = report["chain"](midtrain)
    assert [s["dir"] for s in stages] == [pretrain, midtrain]
    assert report["start_offsets"](stages) == [0, 6000]  # step 60's tokens, not the end of pretraining
    assert stages[0]["wall_s"] == 60 + 100  # each run from its start to its last record: not the hour between
    assert stages[0]["run"]["device"] == "machine 1"  # the last start that trained
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    drawn = {}
    real_plot = plt.Axes.plot

    def plot(ax, xs, ys, *args, label=None, **kwargs):
        drawn[label] = (list(xs), list(ys))
        return real_plot(ax, xs, ys, *args, label=label, **kwargs)
    plt.Axes.plot = plot
    try:
        pngs = report["plot"](stages, str(tmp_path), plt)
    finally:
        plt.Axes.plot = real_plot
    assert "tasks.png" in pngs
    assert drawn["midtrain train"][0][0] == 6000 + 10 * 50
    assert "pretrain val (web)" in drawn and "midtrain val (chat)" in drawn
    assert "a acc_norm" in drawn and "b acc_norm" in drawn and "a and b chance" in drawn
    assert not any(label in drawn for label in ("a chance", "b chance"))
    text = report["markdown"](stages, pngs)
    assert "wall time: 2.7 min (its runs, without the gaps between them)" in text


def test_without_matplotlib_the_report_is_the_text_and_says_how_to_get_the_plots(tmp_path):
    write_stage(str(tmp_path / "pretrain"), [(0, [10, 20], 100, "data/web")])
    (tmp_path / "no_matplotlib").mkdir()
    (tmp_path / "no_matplotlib" / "matplotlib.py").write_text("raise ImportError('matplotlib is not installed')\n")
    result = subprocess.run([sys.executable, "report.py", str(tmp_path / "pretrain")], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(tmp_path / "no_matplotlib")})
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "pretrain" / "report" / "report.md").read_text()
    assert "last evaluation: step 20, val loss 4.0000" in text and ".png" not in text
    assert "No plots: they need matplotlib (pip install matplotlib" in text
    assert "pip install matplotlib" in result.stdout
