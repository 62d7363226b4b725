"""The loss at every step of a tiny eager fp32 run, against the trajectory checked in beside this file
(tests/loss_trajectory.json), as torchtitan's CI does with its loss files: a change that moves the numbers
must rewrite the file on purpose (UPDATE_TRAJECTORY=1 python -m pytest tests/test_trajectory.py).
Exact on the torch that wrote it (one thread); within 1e-4 on another torch, whose kernels may round
differently. Its data is written here from a seed, so no Python version's standard library enters it."""
import json
import os

import numpy as np
import torch

from conftest import ROOT, records, run_script

PINNED = os.path.join(ROOT, "tests", "loss_trajectory.json")
RUN = ["tests/tiny_model.py", "--max_iters=16", "--log_interval=1", "--eval_interval=16", "--eval_iters=1",
       "--micro_batch_size=4", "--batch_size=8", "--learning_rate=1e-2", "--muon_lr=1e-2", "--warmup_iters=2",
       "--use_muon=True", "--qk_norm=True", "--lr_schedule=wsd"]


def test_the_loss_trajectory_is_pinned(tmp_path):
    words = [f"w{i}" for i in range(200)] + ["the", "a", "def", "return", "(", ")", ":", "\n"]
    rng = np.random.default_rng(0)
    (tmp_path / "docs").mkdir()
    for i in range(60):
        (tmp_path / "docs" / f"{i}.txt").write_text(" ".join(rng.choice(words, 400)))
    run_script(os.path.join(ROOT, "prepare.py"), "docs", "--out=data", "--tokenizer=bytes", "--val_fraction=0.1",
               cwd=tmp_path)
    run_script("train.py", *RUN, f"--data_dir={tmp_path}/data", f"--out_dir={tmp_path}/run")
    losses = [loss for _, loss in sorted(records(tmp_path / "run").items())]
    if os.environ.get("UPDATE_TRAJECTORY") == "1":
        with open(PINNED, "w") as f:
            json.dump({"torch": torch.__version__, "run": RUN, "losses": losses}, f, indent=1)
    with open(PINNED) as f:
        pinned = json.load(f)
    assert pinned["run"] == RUN and len(losses) == 16
    if pinned["torch"] == torch.__version__:
        assert losses == pinned["losses"]
    else:
        np.testing.assert_allclose(losses, pinned["losses"], rtol=1e-4)
