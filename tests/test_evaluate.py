"""Downstream evaluation: the demo's held-out split, task scoring against lm-evaluation-harness,
generative tasks, the benchmark converter, and the command on checkpoints and exports."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from infra.checkpoint import load_checkpoint, model_from_checkpoint
from conftest import HANG_S, metric_records
from conftest import run_script as run
from data import read_shard
from evaluate import evaluate_tasks, load_task, normalize, score_multiple_choice, with_shots
import tokenizer as tok


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """The tests' model trained 60 steps on the demo text: a checkpoint, and its export in float32."""
    out = tmp_path_factory.mktemp("evaluate")
    run("train.py", "tests/tiny_model.py", f"--data_dir={data}", f"--out_dir={out}/run", "--max_iters=60",
        "--micro_batch_size=16", "--batch_size=32", "--learning_rate=1e-2", "--warmup_iters=4", "--eval_interval=60",
        "--eval_iters=2", "--log_interval=20")
    run("export_hf.py", f"--ckpt={out}/run", f"--hf_dir={out}/hf", "--dtype=float32")
    return out


def test_no_val_answer_or_task_item_occurs_in_training(data):
    meta = json.loads(open(os.path.join(data, "meta.json")).read())
    enc = tok.load_tokenizer(data)
    train = enc.decode(
        np.concatenate([read_shard(os.path.join(data, s)) for s in meta["splits"]["train"]["shards"]]).tolist()
    )
    collapsed = " ".join(train.split())

    def answers(directory, split):
        chat_meta = json.loads(open(os.path.join(directory, "meta.json")).read())
        ids = np.concatenate([read_shard(os.path.join(directory, s)) for s in chat_meta["splits"][split]["shards"]])
        masks = np.concatenate([read_shard(os.path.join(directory, s)) for s in chat_meta["splits"][split]["masks"]])
        learned = enc.decode(np.where(masks > 0, ids, tok.bos_id(enc)).tolist())  # the assistant's words, BOS between
        return {a.replace("<|im_end|>", "").strip() for a in learned.split("<|endoftext|>") if a.strip()}

    val_answers, train_answers = answers(data + "-chat", "val"), answers(data + "-chat", "train")
    assert len(val_answers) > 100
    assert not [a for a in val_answers if a in train_answers or a in collapsed]
    items = 0
    for path in glob.glob(os.path.join(data + "-tasks", "*.jsonl")):
        task = load_task(path)
        for item in task["examples"]:
            if task["kind"] == "generative":
                whole = item["prompt"] + item["answer"]
                assert whole[-200:] not in train  # the end of the prompt with its answer
            elif task["options"]["chat"]:
                assert item["choices"][item["answer"]] not in collapsed
            else:
                assert item["context"].split("\n")[-1] + "\n" + item["choices"][item["answer"]] not in train
            items += 1
    assert items == 600


@pytest.mark.slow
def test_multiple_choice_agrees_with_lm_evaluation_harness(data, trained, tmp_path):
    pytest.importorskip("lm_eval")
    # two tasks: the demo's next line of code (target delimiter "\n") and a HellaSwag-shaped one (" "),
    # some of whose contexts end in spaces (moved into the continuation)
    next_line = [json.loads(line) for line in open(os.path.join(data + "-tasks", "next_line.jsonl"))][:24]
    spaced = [
        {
            "context": item["context"][-120:] + ("  " if i % 3 == 0 else ""),
            "choices": [c.strip() for c in item["choices"]],
            "answer": item["answer"],
        }
        for i, item in enumerate(next_line)
    ]
    configs = {"demo_next_line": (next_line, "\\n"), "demo_spaced": (spaced, " ")}
    for name, (items, delimiter) in configs.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
        (tmp_path / f"{name}.json").write_text(json.dumps({"target_delimiter": delimiter.replace("\\n", "\n")}))
        (tmp_path / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / name}.jsonl\n"
            f'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{{{context}}}}"\n'
            f'doc_to_choice: "{{{{choices}}}}"\ndoc_to_target: "{{{{answer}}}}"\ntarget_delimiter: "{delimiter}"\n'
            f"metric_list:\n  - metric: acc\n  - metric: acc_norm\n  - metric: acc_bytes\n"
        )
    result = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={trained}/hf,dtype=float32",
         "--tasks", ",".join(configs), "--include_path", str(tmp_path), "--device", "cpu", "--batch_size", "8",
         "--output_path", str(tmp_path / "lm_eval"), "--log_samples"],
        cwd=tmp_path, capture_output=True, text=True, timeout=HANG_S,
        env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    model, encoder = model_from_checkpoint(load_checkpoint(f"{trained}/run"))
    model.eval()
    for name, (items, _) in configs.items():
        samples = [
            json.loads(line)
            for path in glob.glob(f"{tmp_path}/lm_eval/**/samples_{name}_*.jsonl", recursive=True)
            for line in open(path)
        ]
        assert len(samples) == len(items)
        task = load_task(str(tmp_path / f"{name}.jsonl"))
        ours = score_multiple_choice(model, encoder, task, list(range(len(items))), model.args.block_size, 16, 7, "cpu",
                                     torch.autocast("cpu", enabled=False))
        mine = evaluate_tasks(
            model,
            encoder,
            [task],
            block_size=model.args.block_size,
            micro_batch_size=16,
            device="cpu",
            autocast=torch.autocast("cpu", enabled=False),
        )
        for sample in samples:
            theirs = [float(ll) for ll, _ in sample["filtered_resps"]]  # written as strings
            assert np.allclose(ours[sample["doc_id"]], theirs, rtol=0, atol=1e-4), (name, sample["doc_id"])
            assert np.argmax(ours[sample["doc_id"]]) == np.argmax(theirs)
        for metric in ("acc", "acc_norm", "acc_bytes"):
            assert mine[name][metric] == pytest.approx(np.mean([s[metric] for s in samples]))


def test_generative_tasks_and_their_normalization(trained, tmp_path):
    assert normalize("The answer is 12.\n#### 1,234", "number") == "1234"
    assert normalize("so 3 apples and then 45.", "number") == "45" and normalize("none", "number") == ""
    assert normalize(" counter_value(x)", "identifier") == "counter_value" and normalize("  Yes \n", "exact") == "Yes"
    # a prompt the model continues with text it has seen many times: exact match where it copies
    checkpoint = load_checkpoint(f"{trained}/run")
    model, encoder = model_from_checkpoint(checkpoint)
    model.eval()
    prompts = ["def __init__(self", "import os\nimport", "    return"]
    expected = []
    for prompt in prompts:  # what greedy decoding gives, cut at the first newline
        ids = torch.tensor([[tok.bos_id(encoder)] + encoder.encode_ordinary(prompt)])
        generated = [int(t) for t in model.generate(ids, 6, temperature=0)]
        expected.append(encoder.decode(generated).split("\n")[0])
    (tmp_path / "continue.jsonl").write_text(
        "".join(
            json.dumps({"prompt": p, "answer": a}) for p, a in zip(prompts, [expected[0], expected[1], "no such thing"])
        ).replace("}{", "}\n{")
    )
    (tmp_path / "continue.json").write_text(json.dumps({"stop": ["\n"], "max_new_tokens": 6}))
    task = load_task(str(tmp_path / "continue.jsonl"))
    scores = evaluate_tasks(model, encoder, [task], block_size=model.args.block_size, micro_batch_size=16, device="cpu",
                              autocast=torch.autocast("cpu", enabled=False))
    assert scores["continue"] == {"exact_match": pytest.approx(2 / 3), "examples": 3}
    # few-shot: other examples of the task, with their answers, before the example
    (tmp_path / "continue.json").write_text(json.dumps({"shots": 2}))
    shots = with_shots(load_task(str(tmp_path / "continue.jsonl")), 0)
    assert (
        shots.endswith("\n\n" + prompts[0]) and shots.count("\n\n") == 2 and prompts[0] not in shots[: -len(prompts[0])]
    )


@pytest.mark.slow
def test_evaluate_command_on_a_checkpoint_and_its_export(data, trained, tmp_path):
    tasks = ",".join(sorted(glob.glob(os.path.join(data + "-tasks", "*.jsonl"))))
    scores = []
    for source in (f"{trained}/run", f"hf:{trained}/hf", f"{trained}/hf"):
        result = run("evaluate.py", f"--ckpt={source}", f"--tasks={tasks}", "--examples=12", "--device=cpu",
                     f"--out_file={tmp_path}/scores.json")
        assert "next_line" in result.stdout and "identifier" in result.stdout and "docstring" in result.stdout
        scores.append(json.loads((tmp_path / "scores.json").read_text())["tasks"])
    assert scores[0].keys() == scores[1].keys() == scores[2].keys()
    for name in scores[0]:  # the export holds the same model (float32)
        assert scores[0][name] == pytest.approx(scores[1][name]) and scores[1][name] == scores[2][name]
    assert scores[0]["next_line"]["examples"] == 12 and scores[0]["next_line"]["chance"] == pytest.approx(0.25)
    bad = run("evaluate.py", f"--ckpt={trained}/run", "--tasks=no/such/task.jsonl", check=False)
    assert bad.returncode != 0 and "no task file at no/such/task.jsonl" in bad.stderr


def test_convert_benchmarks_from_parquet(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = {
        "hellaswag": [{"activity_label": "Baking", "ctx_a": "A man mixes flour.", "ctx_b": "he", "ctx": "",
                       "endings": ["bakes [title] bread.", "swims.", "sings.", "flies."], "label": "0"}],
        "arc": [{"question": "What is 2+2?", "choices": {"text": ["3", "4"], "label": ["A", "B"]}, "answerKey": "B"}],
        "mmlu": [{"question": " Which? ", "subject": "high_school_math", "choices": ["a", "b", "c", "d"], "answer": 2}],
        "gsm8k": [{"question": "Tom has 2 apples and buys 3.", "answer": "2 + 3 = 5\n#### 5"}],
    }
    expected = {
        "hellaswag": {
            "context": "Baking: A man mixes flour. He",
            "choices": ["bakes. bread.", "swims.", "sings.", "flies."],
            "answer": 0,
        },
        "arc": {"context": "Question: What is 2+2?\nAnswer:", "choices": ["3", "4"], "answer": 1},
        "mmlu": {
            "context": "The following are multiple choice questions (with answers) about high school math.\n\n"
            "Which?\nA. a\nB. b\nC. c\nD. d\nAnswer:",
            "choices": ["A", "B", "C", "D"],
            "answer": 2,
        },
        "gsm8k": {"prompt": "Question: Tom has 2 apples and buys 3.\nAnswer:", "answer": "2 + 3 = 5\n#### 5"},
    }
    for benchmark, table in rows.items():
        pq.write_table(pa.Table.from_pylist(table), tmp_path / f"{benchmark}.parquet")
        run("convert_tasks.py", str(tmp_path / f"{benchmark}.parquet"), f"--benchmark={benchmark}",
            f"--out={tmp_path}/tasks/{benchmark}.jsonl")
        task = load_task(str(tmp_path / "tasks" / f"{benchmark}.jsonl"))
        assert task["examples"] == [expected[benchmark]]
    assert task["options"]["normalize"] == "number" and task["options"]["shots"] == 5
    run("convert_tasks.py", str(tmp_path / "arc.parquet"), "--benchmark=arc", f"--out={tmp_path}/tasks/gsm8k.jsonl")
    assert load_task(str(tmp_path / "tasks" / "gsm8k.jsonl"))["examples"] == [expected["arc"]]  # its own: replaced
    assert normalize(expected["gsm8k"]["answer"], "number") == "5"
    bad = run(
        "convert_tasks.py", str(tmp_path / "arc.parquet"), "--benchmark=gsm8k", f"--out={tmp_path}/x.jsonl", check=False
    )
    assert bad.returncode != 0 and "a row is not gsm8k's" in bad.stderr


def test_the_full_pass_scores_every_val_token_once_at_any_seed_and_world_size(data):
    from data import open_dataset, read_windows
    from evaluate import validation_windows
    datasets = [open_dataset(data, 64), open_dataset(data + "-chat", 64)]

    def windows(world_size, seed, **kwargs):
        return [w for rank in range(world_size) for share in validation_windows(
            datasets, micro_batches=3, micro_batch_size=4, block_size=64, seed=seed, rank=rank, world_size=world_size,
            **kwargs) for micro_batch in share for w in micro_batch if w is not None]
    full = windows(1, 1337, full_pass=True)
    for d, dataset in enumerate(datasets):  # each target position of each val shard, once
        for shard, tokens in enumerate(dataset.tokens["val"]):
            mine = [w for w in full if w[:2] == (d, shard)]
            scored = np.zeros(len(tokens), dtype=int)
            _, targets = read_windows(datasets, "val", mine, 64, False)
            for (_, _, offset, _), row in zip(mine, targets):
                scored[offset + 1:offset + 65] += row >= 0
            assert scored[0] == 0 and (scored[1:] == 1).all()
    assert all(sorted(windows(n, seed, full_pass=True)) == sorted(full) for n in (2, 3) for seed in (1, 2))
    # None: the full pass only when it fits the budget of micro_batches x micro_batch_size windows
    assert windows(1, 1, full_pass=None) != windows(1, 2, full_pass=None) and len(windows(1, 1, full_pass=None)) == 24


@pytest.mark.slow
def test_the_evaluate_command_gives_train_py_s_full_pass_score(data, tmp_path):
    args = [
        "tests/tiny_model.py",
        f"--data_dir={data}",
        f"--out_dir={tmp_path}/run",
        "--max_iters=4",
        "--eval_interval=4",
        "--micro_batch_size=4",
        "--batch_size=4",
        "--eval_iters=1",
        "--log_interval=1",
        "--val_full_pass=True",
    ]
    run("train.py", *args)
    logged = [r for r in metric_records(tmp_path / "run") if "val_loss" in r][-1]
    result = run("evaluate.py", f"--ckpt={tmp_path}/run", "--tasks=", f"--val_data={data}", "--micro_batch_size=4",
                 "--device=cpu", f"--out_file={tmp_path}/scores.json")
    assert "(every val token once)" in result.stdout
    scores = json.loads((tmp_path / "scores.json").read_text())["val"][data]
    assert scores["loss"] == pytest.approx(logged["val_loss"], rel=1e-6) and scores["bpb"] == pytest.approx(
        logged["val_bpb"], rel=1e-6
    )
