"""Numbers pinned in files beside this one, as torchtitan's CI does with its loss files: the loss at every
step of a tiny eager fp32 run (tests/loss_trajectory.json), and a checkpoint written by an earlier version
of the code (tests/fixtures/ckpt_0000008) with the losses its resume gives. A change that moves the numbers
must rewrite them on purpose (UPDATE_TRAJECTORY=1 python -m pytest tests/test_trajectory.py); a change of
the checkpoint format must keep loading the old one or refuse it in one line naming its format version.
Exact on the torch that wrote them (one thread); within 1e-4 on another torch, whose kernels may round
differently. The data is written here from a seed, so no Python version's standard library enters it."""
import json
import os
import shutil

import numpy as np
import torch

from conftest import ROOT, records, run_script

PINNED = os.path.join(ROOT, "tests", "loss_trajectory.json")
FIXTURE = os.path.join(ROOT, "tests", "fixtures")
UPDATE = os.environ.get("UPDATE_TRAJECTORY") == "1"
RUN = ["tests/tiny_model.py", "--max_iters=16", "--log_interval=1", "--eval_interval=16", "--eval_iters=1",
       "--micro_batch_size=4", "--batch_size=8", "--learning_rate=1e-2", "--muon_lr=1e-2", "--warmup_iters=2",
       "--use_muon=True", "--qk_norm=True", "--lr_schedule=wsd"]


def seeded_data(tmp_path):
    """A byte-tokenized dataset of seeded random words: the same on every machine and Python."""
    words = [f"w{i}" for i in range(200)] + ["the", "a", "def", "return", "(", ")", ":", "\n"]
    rng = np.random.default_rng(0)
    (tmp_path / "docs").mkdir()
    for i in range(60):
        (tmp_path / "docs" / f"{i}.txt").write_text(" ".join(rng.choice(words, 400)))
    run_script(os.path.join(ROOT, "prepare.py"), "docs", "--out=data", "--tokenizer=bytes", "--val_fraction=0.1",
               cwd=tmp_path)
    return str(tmp_path / "data")


def assert_pinned(losses, pinned):
    if pinned["torch"] == torch.__version__:
        assert losses == pinned["losses"]
    else:
        np.testing.assert_allclose(losses, pinned["losses"], rtol=1e-4)


def test_the_loss_trajectory_is_pinned(tmp_path):
    run_script("train.py", *RUN, f"--data_dir={seeded_data(tmp_path)}", f"--out_dir={tmp_path}/run")
    losses = [loss for _, loss in sorted(records(tmp_path / "run").items())]
    if UPDATE:
        with open(PINNED, "w") as f:
            json.dump({"torch": torch.__version__, "run": RUN, "losses": losses}, f, indent=1)
    with open(PINNED) as f:
        pinned = json.load(f)
    assert pinned["run"] == RUN and len(losses) == 16
    assert_pinned(losses, pinned)


SMALL = ["tests/tiny_model.py", "--n_layer=1", "--n_head=2", "--n_kv_head=1", "--n_embd=32", "--log_interval=1",
         "--eval_interval=8", "--eval_iters=1", "--micro_batch_size=4", "--batch_size=8", "--learning_rate=1e-2",
         "--muon_lr=1e-2", "--warmup_iters=2", "--use_muon=True", "--max_iters=12"]


def test_a_checkpoint_of_an_earlier_version_resumes_exactly(tmp_path):
    data = seeded_data(tmp_path)
    if UPDATE:  # a run stopped at step 8 (its checkpoint is the fixture), then resumed to step 12
        run_script("train.py", *SMALL, f"--data_dir={data}", f"--out_dir={tmp_path}/first", "--max_iters=8")
        shutil.rmtree(os.path.join(FIXTURE, "ckpt_0000008"), ignore_errors=True)
        shutil.copytree(tmp_path / "first" / "ckpt_0000008", os.path.join(FIXTURE, "ckpt_0000008"))
    os.makedirs(tmp_path / "run")
    shutil.copytree(os.path.join(FIXTURE, "ckpt_0000008"), tmp_path / "run" / "ckpt_0000008")
    run_script("train.py", *SMALL, f"--data_dir={data}", f"--out_dir={tmp_path}/run", "--init_from=resume")
    losses = [loss for step, loss in sorted(records(tmp_path / "run").items())]
    if UPDATE:
        with open(os.path.join(FIXTURE, "resume_losses.json"), "w") as f:
            json.dump({"torch": torch.__version__, "run": SMALL, "losses": losses}, f, indent=1)
    with open(os.path.join(FIXTURE, "resume_losses.json")) as f:
        pinned = json.load(f)
    assert pinned["run"] == SMALL and len(losses) == 4  # steps 9 to 12
    assert_pinned(losses, pinned)
