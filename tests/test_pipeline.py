"""Chat data and loss masks, mixtures, and the pipeline end to end."""
import json
import os
import subprocess

import numpy as np
import pytest

from conftest import HANG_S, ROOT, one_line_error
from conftest import run_script as run
from data import learned_targets, open_dataset, read_shard, read_windows, sample_windows
import tokenizer as tok

TINY = ["tests/tiny_model.py", "--eval_iters=2", "--log_interval=1", "--micro_batch_size=4", "--batch_size=8"]



def test_chat_prepare_masks_exactly_the_assistant_tokens(data, tmp_path):
    conversations = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."},
         {"role": "assistant", "content": "Seven."}, {"role": "user", "content": "Another?"},
         {"role": "assistant", "content": "Eleven, then 13."}],
        [{"role": "user", "content": "Café?"}, {"role": "assistant", "content": " Ünïcode ok\n  indented"}],
    ]
    lines = [json.dumps({"messages": c}) for c in conversations]
    lines.insert(1, "{not json")
    lines.insert(2, json.dumps({"messages": [{"role": "robot", "content": "beep"}]}))
    lines.insert(3, json.dumps({"messages": []}))
    (tmp_path / "chat.jsonl").write_text(("\n".join(lines) + "\n") * 20)
    result = run(
        "prepare.py",
        str(tmp_path / "chat.jsonl"),
        "--chat=True",
        f"--tokenizer={data}",
        f"--out={tmp_path}/chat",
        "--val_fraction=0.3",
    )
    assert f"{tmp_path}/chat.jsonl:2: not valid JSON" in result.stderr
    assert f"{tmp_path}/chat.jsonl:3: a message is not" in result.stderr and "skipped 60 documents" in result.stderr
    enc = tok.load_tokenizer(str(tmp_path / "chat"))
    meta = json.loads((tmp_path / "chat" / "meta.json").read_text())
    assert meta["chat"] and meta["skipped_documents"] == 60
    tokens = np.concatenate([read_shard(str(tmp_path / "chat" / n)) for n in meta["splits"]["train"]["shards"]])
    masks = np.concatenate([read_shard(str(tmp_path / "chat" / n)) for n in meta["splits"]["train"]["masks"]])
    assert len(tokens) == len(masks) and set(np.unique(masks)) == {0, 1}
    # each conversation's learned tokens are exactly its assistant answers, each with its <|im_end|>
    starts = np.flatnonzero(tokens == tok.bos_id(enc))
    for start, end in zip(starts, list(starts[1:]) + [len(tokens)]):
        learned = enc.decode(tokens[start:end][masks[start:end] == 1].tolist())
        assert learned in ("Seven.<|im_end|>Eleven, then 13.<|im_end|>", " Ünïcode ok\n  indented<|im_end|>")


def test_nothing_to_learn_is_refused_and_a_micro_batch_with_nothing_gives_a_finite_loss(data, tmp_path):
    questions = [{"messages": [{"role": "user", "content": f"Question {i}: what is {i} squared?"}]} for i in range(300)]
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    # no assistant message anywhere: nothing a finetune could learn, refused before a dataset is written
    result = run("prepare.py", str(tmp_path / "questions.jsonl"), "--chat=True", f"--tokenizer={data}",
                 f"--out={tmp_path}/q", "--val_fraction=0.2", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr  # after its progress line, one error line
    assert "conversations have no assistant message: nothing to learn" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "q").exists()
    # a few answered among them: most micro-batches hold nothing to learn, and their loss is 0, not NaN
    answered = [{"messages": [*q["messages"], {"role": "assistant", "content": f"{i * i}."}]}
                for i, q in enumerate(questions[:30])]
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions + answered))
    run("prepare.py", str(tmp_path / "questions.jsonl"), "--chat=True", f"--tokenizer={data}", f"--out={tmp_path}/q",
        "--val_fraction=0.2")
    run("train.py", *TINY, f"--data_dir={tmp_path}/q", f"--out_dir={tmp_path}/out", "--use_loss_mask=True",
        "--max_iters=6", "--eval_interval=6")
    with open(tmp_path / "out" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 6 and all(np.isfinite(losses)) and 0.0 in losses and max(losses) > 0, losses
    assert all(np.isfinite(r["val_loss"]) for r in records if "val_loss" in r)
    # a dataset that says it holds nothing to learn is refused at the start
    meta = json.loads((tmp_path / "q" / "meta.json").read_text())
    meta["splits"]["train"]["learned_tokens"] = 0
    (tmp_path / "q" / "meta.json").write_text(json.dumps(meta))
    result = run("train.py", *TINY, f"--data_dir={tmp_path}/q", f"--out_dir={tmp_path}/out2", "--use_loss_mask=True",
                 check=False)
    assert "use_loss_mask leaves nothing to learn" in one_line_error(result)


def test_mixture_follows_the_weights_and_is_deterministic(data):
    datasets = [open_dataset(data, 64), open_dataset(data + "-chat", 64)]
    windows = sample_windows(datasets, [0.7, 0.3], "train", 20000, (1337, 5))
    share = np.mean([d == 0 for d, _, _ in windows])
    assert abs(share - 0.7) < 0.015  # 4.6 standard deviations of a binomial share over 20,000 draws
    assert windows == sample_windows(datasets, [0.7, 0.3], "train", 20000, (1337, 5))  # resumes exactly
    assert windows != sample_windows(datasets, [0.7, 0.3], "train", 20000, (1337, 6))
    # chat windows start at a conversation's first token
    x, y = read_windows(datasets, "train", [w for w in windows if w[0] == 1][:16], 64, True)
    assert (x[:, 0] == datasets[1].meta["bos_id"]).all() and (y == -1).any() and (y >= 0).any()
    # train.py's count of a step's learned targets, from the masks alone, over text and chat windows
    x, y = read_windows(datasets, "train", windows[:64], 64, True)
    assert learned_targets(datasets, "train", windows[:64], 64) == int((y >= 0).sum()) < 64 * 64


@pytest.mark.slow
def test_the_pipeline_end_to_end(data, tmp_path):
    """./run_pipeline.sh configs/tiny.py with a few steps per stage (tests/fast_pipeline.py), on the
    repo's own demo data (built by the pipeline if missing)."""
    env = {**os.environ, "OUT_ROOT": str(tmp_path)}
    command = ["bash", "run_pipeline.sh", "configs/tiny.py", "tests/fast_pipeline.py"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=HANG_S)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for stage in ("pretrain", "midtrain", "finetune"):
        assert f"=== {stage} -> {tmp_path}/{stage}-tiny-fast_pipeline" in result.stdout
        assert os.path.exists(tmp_path / f"{stage}-tiny-fast_pipeline" / "ckpt_0000008")
    from infra.checkpoint import load_checkpoint

    assert load_checkpoint(str(tmp_path / "finetune-tiny-fast_pipeline"))["parent"].startswith(
        str(tmp_path / "midtrain-tiny-fast_pipeline")
    )
    assert (tmp_path / "finetune-tiny-fast_pipeline" / "hf" / "model.safetensors").exists()
    # the report of the three stages: Markdown, and plots that are valid PNG images
    report = tmp_path / "finetune-tiny-fast_pipeline" / "report"
    text = (report / "report.md").read_text()
    assert all(f"## {tmp_path}/{stage}-tiny-fast_pipeline" in text for stage in ("pretrain", "midtrain", "finetune"))
    assert "tasks at step 8: next_line acc" in text and "![tasks.png](tasks.png)" in text
    import matplotlib.image
    for name in ("loss.png", "lr.png", "throughput.png", "tasks.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(str(report / name)).shape[:2] == (450, 800)
    # a rerun finds every stage done: it resumes each at its last step and trains no further
    checkpoints = {
        stage: sorted(p for p in os.listdir(tmp_path / f"{stage}-tiny-fast_pipeline") if p.startswith("ckpt_"))
        for stage in ("pretrain", "midtrain", "finetune")
    }
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=HANG_S)
    # (each stage is finished: it says so and ends at once, writing nothing)
    assert again.returncode == 0 and "resuming it" in again.stdout and again.stdout.count(" is finished (") == 3
    assert checkpoints == {
        stage: sorted(p for p in os.listdir(tmp_path / f"{stage}-tiny-fast_pipeline") if p.startswith("ckpt_"))
        for stage in checkpoints
    }
