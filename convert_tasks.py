"""
Common benchmarks, from the Hugging Face datasets' parquet files on disk, to evaluate.py's tasks:
    python convert_tasks.py hellaswag/validation-00000-of-00001.parquet --benchmark=hellaswag \
        --out=tasks/hellaswag.jsonl
    python convert_tasks.py "mmlu/all/test-*.parquet" --benchmark=mmlu --out=tasks/mmlu.jsonl
    python evaluate.py --ckpt=out/pretrain --tasks=tasks/hellaswag.jsonl
benchmark: hellaswag (Rowan/hellaswag), arc (allenai/ai2_arc, ARC-Easy or ARC-Challenge), mmlu
(cais/mmlu), gsm8k (openai/gsm8k, main). The prompts, choices and answers are built as
lm-evaluation-harness builds them, so the scores compare with its (0-shot; GSM8K 5-shot from the
same file). Writes OUT (the examples) and OUT with .json (the task's options), replacing only
files it wrote itself. Needs pyarrow.
"""
import glob
import json
import os
import re
import sys

# ----------------------------------------------------------------------------------------------
sources = []                    # parquet files or globs (plain arguments)
benchmark = ""                  # hellaswag, arc, mmlu or gsm8k
out = ""                        # the task file to write (.jsonl)
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
# ----------------------------------------------------------------------------------------------

from infra.rundir import check_replaceable_file


def hellaswag_text(text):
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def hellaswag(row):
    context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return {"context": hellaswag_text(row["activity_label"] + ": " + context),
            "choices": [hellaswag_text(ending) for ending in row["endings"]], "answer": int(row["label"])}


def arc(row):
    return {"context": f"Question: {row['question']}\nAnswer:", "choices": list(row["choices"]["text"]),
            "answer": list(row["choices"]["label"]).index(row["answerKey"])}


def mmlu(row):
    subject = row["subject"].replace("_", " ")
    letters = "".join(f"\n{letter}. {choice}" for letter, choice in zip("ABCD", row["choices"]))
    return {
        "context": f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        f"{row['question'].strip()}{letters}\nAnswer:",
        "choices": ["A", "B", "C", "D"],
        "answer": int(row["answer"]),
    }


def gsm8k(row):
    return {"prompt": f"Question: {row['question']}\nAnswer:", "answer": row["answer"]}


def is_example(value):
    return isinstance(value, dict) and "answer" in value and ("choices" in value or "prompt" in value)


def is_options(value):
    return isinstance(value, dict) and set(value) <= {"shots", "stop", "max_new_tokens", "normalize"}


BENCHMARKS = {  # the conversion of a row, and the task's options
    "hellaswag": (hellaswag, {}),
    "arc": (arc, {}),
    "mmlu": (mmlu, {}),
    "gsm8k": (
        gsm8k,
        {"shots": 5, "stop": ["Question:", "</s>", "<|im_end|>"], "max_new_tokens": 256, "normalize": "number"},
    ),
}

if __name__ == "__main__":
    if benchmark not in BENCHMARKS or not out.endswith(".jsonl"):
        sys.exit(f"convert_tasks.py: error: give --benchmark= one of {', '.join(BENCHMARKS)} and --out=<file>.jsonl")
    try:  # the examples and, beside them, the options
        for path, ours in ((out, is_example), (out[:-len(".jsonl")] + ".json", is_options)):
            check_replaceable_file(path, ours, "a task file convert_tasks.py wrote", "out")
    except ValueError as e:
        sys.exit(f"convert_tasks.py: error: {e}")
    try:
        import pyarrow.parquet as pq
    except ImportError:
        sys.exit("convert_tasks.py: error: reading parquet needs pyarrow (pip install pyarrow)")
    paths = sorted(p for source in sources for p in glob.glob(source))
    if not paths:
        sys.exit(f"convert_tasks.py: error: no parquet files at {sources}")
    convert, options = BENCHMARKS[benchmark]
    examples = []
    for path in paths:
        for row in pq.read_table(path).to_pylist():
            try:
                examples.append(convert(row))
            except (KeyError, ValueError, TypeError) as e:
                sys.exit(f"convert_tasks.py: error: {path}: a row is not {benchmark}'s ({type(e).__name__}: {e})")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(example, ensure_ascii=False) + "\n" for example in examples)
    with open(out[:-len(".jsonl")] + ".json", "w") as f:
        json.dump(options, f)
    os.replace(out + ".tmp", out)
    print(f"wrote {out}: {len(examples)} {benchmark} examples from {len(paths)} file(s)")
