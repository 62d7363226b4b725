r"""
Evaluation: how good the model is, during training (train.py calls these) and after:
    python evaluate.py --ckpt=out/finetune-tiny --tasks="data/demo-tasks/*.jsonl"
    python evaluate.py --ckpt=hf:hf/my-model --tasks=tasks/hellaswag.jsonl --examples=1000
    python evaluate.py --ckpt=out/pretrain-tiny --tasks= --val_data=data/demo   # a final val score

1. Validation loss and bits per byte, per dataset, on the same held-out windows at every
   evaluation: every val token once (the full pass: the same score at any seed and world size), or
   a fixed set of random windows for a val split too large for the evaluation's budget. In chat
   datasets only the learned targets (the assistant's words) count. Bits per
   byte does not depend on the tokenizer: the loss in bits summed over the UTF-8 bytes the targets
   stand for (special tokens excluded).
2. Downstream tasks. A task is a JSONL file of examples, with an optional <name>.json of options
   beside it (convert_tasks.py writes HellaSwag, ARC, MMLU and GSM8K so; prepare.py the demo's):
   multiple choice  {"context": str, "choices": [str, ...], "answer": index of the right one}
       Scored as lm-evaluation-harness scores it, example for example: each choice's log-likelihood
       given the context, the continuation being target_delimiter + choice, with trailing whitespace
       of the context moved into it; context and whole text each encoded with the BOS the model was
       trained with, the continuation being the whole's tokens past the context's; cut from the left
       to the model's window. acc: the highest sum; acc_norm: divided by the choice's length in
       characters; acc_bytes: in UTF-8 bytes.
   generative  {"prompt": str, "answer": str}
       Greedy decoding until a stop string (or max_new_tokens), then exact match of the output and the
       answer after the task's normalization: exact (stripped), number (GSM8K: the number after
       "####", else the last number; commas dropped), identifier (the leading Python identifier).
   Options, with their defaults: shots 0 (that many examples of the task before each, drawn with a
   fixed seed, joined by "\n\n"), target_delimiter " ", chat false (the context or prompt as a user
   message through the chat template, for chat models), stop ["\n\n"], max_new_tokens 32,
   normalize "exact". The examples are split between ranks, each a disjoint share, and the counts
   summed; every rank runs the same number of forward passes.
"""
import glob
import json
import math
import os
import random
import re
import sys

if __name__ == "__main__":
    ckpt = "out/run"                # a run directory (its newest checkpoint), a checkpoint (ckpt_<step>) or hf:<dir>
    tasks = "data/demo-tasks/*.jsonl"  # task files: comma-separated paths or globs; '': none
    val_data = ""                   # datasets (comma-separated directories) to score the val split of, every token once
    examples = 0                    # the first this many examples of each task; 0: all
    micro_batch_size = 16           # sequences per forward pass when scoring multiple choice
    device = "auto"
    dtype = "auto"                  # 'auto': bfloat16 on cuda, float32 on cpu
    out_file = ""                   # also write the scores here, as JSON (replacing only an earlier scores file)
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())

import numpy as np  # noqa: E402  (after the command's settings: --help answers without loading torch)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from data import ceil_div, read_windows, sample_windows, to_device  # noqa: E402
import tokenizer as tok  # noqa: E402


def full_pass_windows(dataset, d, block_size):
    """Windows that make every val token of a dataset (but each shard's first) a target exactly once:
    consecutive windows of block_size targets, the last of a shard shifted back to end at the shard's
    end, with the targets an earlier window scored left out (the window's fourth element)."""
    windows = []
    for shard, tokens in enumerate(dataset.tokens["val"]):
        for start in range(0, len(tokens) - 1, block_size):
            offset = min(start, len(tokens) - block_size - 1)
            windows.append((d, shard, offset, start - offset))
    return windows


def validation_windows(datasets, *, micro_batches, micro_batch_size, block_size, seed, rank, world_size, full_pass):
    """This rank's validation windows of each dataset, as micro-batches of windows, the same set
    whatever the world size, split between ranks. With full_pass, every val token once
    (full_pass_windows): the same score at any seed. Otherwise micro_batches x micro_batch_size
    random windows, drawn with the key (seed, 2**32, d): a step number training never reaches, so
    never the windows of a training step. full_pass None: the full pass when it needs no more
    windows than that. A share is padded with None windows (nothing learned) to whole
    micro-batches, the same number on every rank: each runs the same forward passes (FSDP needs that)."""
    shares = []
    for d, dataset in enumerate(datasets):
        windows = full_pass_windows(dataset, d, block_size)
        if not (full_pass is True or (full_pass is None and len(windows) <= micro_batches * micro_batch_size)):
            windows = sample_windows([dataset], [1.0], "val", micro_batches * micro_batch_size, (seed, 2**32, d))
            windows = [(d, shard, offset) for _, shard, offset in windows]
        per_rank = ceil_div(ceil_div(len(windows), world_size), micro_batch_size) * micro_batch_size
        mine = windows[rank * per_rank:(rank + 1) * per_rank]
        mine += [None] * (per_rank - len(mine))
        shares.append([mine[k:k + micro_batch_size] for k in range(0, per_rank, micro_batch_size)])
    return shares


@torch.no_grad()
def validation(model, datasets, windows, *, weights, block_size, token_bytes, device, autocast):
    """({dataset directory: (mean loss per learned target, bits per byte)}, their weighted mean),
    summed over every rank's windows (a collective when there are several)."""
    model.eval()
    results = {}
    for dataset, micro_batches in zip(datasets, windows):
        zero = torch.zeros((), device=device, dtype=torch.float64)
        loss_sum, target_count, byte_loss_sum, byte_count = zero, zero, zero, zero  # summed on the device
        for micro_batch in micro_batches:
            x, y = (to_device(a, device) for a in read_windows(datasets, "val", micro_batch, block_size, True))
            with autocast:
                losses = model(x, y, loss_reduction="none").double()  # 0 where the target is -1
            nbytes = token_bytes[y.clamp(min=0)] * (y >= 0)  # 0 for special tokens too
            loss_sum, target_count = loss_sum + losses.sum(), target_count + (y >= 0).sum()
            byte_loss_sum, byte_count = byte_loss_sum + (losses * (nbytes > 0)).sum(), byte_count + nbytes.sum()
        totals = torch.stack([loss_sum, target_count, byte_loss_sum, byte_count])
        if dist.is_initialized():
            dist.all_reduce(totals)
        loss_sum, target_count, byte_loss_sum, byte_count = totals.tolist()
        results[dataset.directory] = (
            loss_sum / max(target_count, 1),
            byte_loss_sum / (math.log(2) * max(byte_count, 1)),
        )
    model.train()
    mean = tuple(float(np.dot(weights, [r[i] for r in results.values()])) for i in range(2))
    return results, mean


# ---- downstream tasks -------------------------------------------------------------------------
_TASK_DEFAULTS = {"shots": 0, "target_delimiter": " ", "chat": False, "stop": ["\n\n"], "max_new_tokens": 32,
                "normalize": "exact"}


def load_task(path, examples=0):
    """{"name", "path", "kind": 'multiple_choice' or 'generative', "options", "examples"}: the first
    `examples` of the file (0: all)."""
    items = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except ValueError as e:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({e})") from None
            if not isinstance(items[-1], dict):
                raise ValueError(f"{path}:{line_number}: an example must be a JSON object")
    if not items:
        raise ValueError(f"{path}: no examples")
    options_path = os.path.splitext(path)[0] + ".json"
    options = dict(_TASK_DEFAULTS)
    if os.path.exists(options_path):
        with open(options_path) as f:
            options.update(json.load(f))
    kind = "multiple_choice" if "choices" in items[0] else "generative"
    needed = {"multiple_choice": ("context", "choices", "answer"), "generative": ("prompt", "answer")}[kind]
    for line, item in enumerate(items, 1):
        if any(key not in item for key in needed):
            raise ValueError(f"{path}:{line}: a {kind.replace('_', ' ')} example needs {', '.join(needed)}")
        text = [item[key] for key in needed if key not in ("choices", "answer")] + (
            item["choices"] if kind == "multiple_choice" and isinstance(item["choices"], list) else [item["answer"]])
        if not all(isinstance(t, str) for t in text) or (kind == "multiple_choice" and not (
                isinstance(item["choices"], list) and len(item["choices"]) >= 2 and isinstance(item["answer"], int)
                and 0 <= item["answer"] < len(item["choices"]))):
            raise ValueError(f"{path}:{line}: " + ("context and choices must be strings (at least two choices), answer "
                                                   "the index of one" if kind == "multiple_choice" else
                                                   "prompt and answer must be strings"))
    return {"name": os.path.splitext(os.path.basename(path))[0], "path": path, "kind": kind, "options": options,
            "examples": items[:examples] if examples else items}


def with_shots(task, index):
    """The example's context or prompt, after `shots` other examples of the task, each with its answer."""
    o, items = task["options"], task["examples"]
    field = "context" if task["kind"] == "multiple_choice" else "prompt"
    others = [i for i in range(len(items)) if i != index]
    shots = random.Random(f"{task['name']}/{index}").sample(others, min(o["shots"], len(others)))

    def solved(item):
        answer = item["choices"][item["answer"]] if task["kind"] == "multiple_choice" else item["answer"]
        return item[field] + o["target_delimiter"] + answer
    return "\n\n".join([solved(items[i]) for i in shots] + [items[index][field]])


def context_ids(encoder, task, text):
    """The ids a context or prompt is scored or continued from: BOS + text, or a chat turn."""
    if task["options"]["chat"]:
        return tok.encode_chat(encoder, [{"role": "user", "content": text}], add_generation_prompt=True)[0]
    return [tok.bos_id(encoder)] + encoder.encode_ordinary(text)


def choice_ids(encoder, task, context, choice):
    """(context ids, continuation ids) of a multiple-choice pair, as lm-evaluation-harness encodes it."""
    if task["options"]["chat"]:  # the answer follows the assistant header directly
        return context_ids(encoder, task, context), encoder.encode_ordinary(choice)
    continuation = task["options"]["target_delimiter"] + choice
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, start = context_ids(encoder, task, context + continuation), context_ids(encoder, task, context)
    return start, whole[len(start):]


def normalize(text, how):
    text = text.strip()
    if how == "number":
        found = re.search(r"####\s*(-?[0-9][0-9.,]*)", text) or ([*re.finditer(r"-?[0-9][0-9.,]*", text)] or [None])[-1]
        return found.group(found.lastindex or 0).replace(",", "").rstrip(".") if found else ""
    if how == "identifier":
        found = re.match(r"[A-Za-z_][A-Za-z0-9_]*", text)
        return found.group(0) if found else ""
    return text


def my_share(count, rank, world_size):
    """The example indices of this rank (every world_size-th), and the size of the largest share."""
    return list(range(rank, count, world_size)), ceil_div(count, world_size)


@torch.no_grad()
def score_multiple_choice(model, encoder, task, indices, block_size, micro_batch_size, batches, device, autocast):
    """{example index: [log-likelihood of each choice]}, in `batches` forward passes of
    micro_batch_size sequences (the last padded with empty rows, so every rank runs as many)."""
    rows = []  # (example, choice, input ids, targets: the continuation's ids at its positions, -1 elsewhere)
    for i in indices:
        item = task["examples"][i]
        context = with_shots(task, i)
        for j, choice in enumerate(item["choices"]):
            start, continuation = choice_ids(encoder, task, context, choice)
            sequence = (start + continuation)[-(block_size + 1):]
            inputs = sequence[:-1]
            n = min(len(continuation), len(inputs))
            targets = [-1] * (len(inputs) - n) + sequence[-n:]
            rows.append((i, j, inputs, targets))
    rows.sort(key=lambda row: -len(row[2]))  # similar lengths together: each batch padded to its longest
    scores = {i: [0.0] * len(task["examples"][i]["choices"]) for i in indices}
    for b in range(batches):
        chunk = rows[b * micro_batch_size:(b + 1) * micro_batch_size]
        length = max([len(inputs) for _, _, inputs, _ in chunk], default=1)
        x = torch.zeros((micro_batch_size, length), dtype=torch.long)
        y = torch.full((micro_batch_size, length), -1, dtype=torch.long)
        for r, (_, _, inputs, targets) in enumerate(chunk):
            x[r, :len(inputs)], y[r, :len(targets)] = torch.tensor(inputs), torch.tensor(targets)
        with autocast:
            losses = model(x.to(device), y.to(device), loss_reduction="none").double().sum(dim=1).tolist()
        for (i, j, _, _), loss in zip(chunk, losses):
            scores[i][j] = -loss
    return scores


@torch.no_grad()
def generate_answers(model, encoder, task, indices, steps, block_size, device, autocast, lockstep):
    """{example index: the text generated greedily}, stopped at the first stop string. With lockstep
    (several ranks) every example runs all max_new_tokens steps and `steps` examples are run, padding
    with repeats, so that every rank makes the same forward passes."""
    o, outputs = task["options"], {}
    stop_token = encoder._special_tokens["<|im_end|>" if o["chat"] else tok.BOS]  # the end of a turn, or of a document
    for k in range(steps if lockstep else len(indices)):
        i = indices[min(k, len(indices) - 1)] if indices else 0
        ids = context_ids(encoder, task, with_shots(task, i))[-(block_size - o["max_new_tokens"]):]
        generated = []
        with autocast:
            for token in model.generate(torch.tensor([ids], device=device), o["max_new_tokens"], temperature=0):
                generated.append(int(token))
                if not lockstep and (
                    generated[-1] == stop_token or any(s in encoder.decode(generated) for s in o["stop"])
                ):
                    break
        text = encoder.decode(generated[:generated.index(stop_token)] if stop_token in generated else generated)
        for s in o["stop"]:
            text = text.split(s)[0]
        if k < len(indices):
            outputs[i] = text
    return outputs


def evaluate_tasks(model, encoder, tasks, *, block_size, micro_batch_size, device, autocast, rank=0, world_size=1):
    """{task name: {metric: value, "examples": n}} over every rank's share (a collective when there are
    several)."""
    results = {}
    for task in tasks:
        indices, largest = my_share(len(task["examples"]), rank, world_size)
        if task["kind"] == "multiple_choice":
            rows_per_rank = [
                sum(len(task["examples"][i]["choices"]) for i in my_share(len(task["examples"]), r, world_size)[0])
                for r in range(world_size)
            ]
            batches = ceil_div(max(rows_per_rank), micro_batch_size)
            scores = score_multiple_choice(
                model, encoder, task, indices, block_size, micro_batch_size, batches, device, autocast
            )
            sums = [0.0, 0.0, 0.0, sum(1 / len(task["examples"][i]["choices"]) for i in scores)]
            for i, lls in scores.items():
                item = task["examples"][i]
                chars = [len(c) for c in item["choices"]]
                nbytes = [len(c.encode("utf-8")) for c in item["choices"]]
                picks = [np.argmax(lls), np.argmax(np.array(lls) / chars), np.argmax(np.array(lls) / nbytes)]
                sums = [s + (p == item["answer"]) for s, p in zip(sums, picks)] + sums[3:]
            names = ["acc", "acc_norm", "acc_bytes", "chance"]
        else:
            outputs = generate_answers(
                model, encoder, task, indices, largest, block_size, device, autocast, world_size > 1
            )
            how = task["options"]["normalize"]
            sums = [
                sum(
                    normalize(text, how) == normalize(task["examples"][i]["answer"], how) for i, text in outputs.items()
                )
            ]
            names = ["exact_match"]
        totals = torch.tensor(sums + [len(indices)], dtype=torch.float64, device=device)
        if world_size > 1:
            dist.all_reduce(totals)
        *sums, count = totals.tolist()
        results[task["name"]] = {**{name: s / max(count, 1) for name, s in zip(names, sums)}, "examples": int(count)}
    return results


def validation_line(val_loss, val_bpb, by_dataset):
    """'val loss L, val bpb B', and each dataset's when there are several."""
    each = "".join(f" | {name}: {v['loss']:.4f}, {v['bpb']:.4f} bpb" for name, v in by_dataset.items())
    return f"val loss {val_loss:.4f}, val bpb {val_bpb:.4f}" + (each if len(by_dataset) > 1 else "")


def scores_line(scores):
    """evaluate_tasks' scores on one line: 'name metric value, ... | name ...'."""
    return " | ".join(f"{name} " + ", ".join(f"{k} {v:.3f}" for k, v in s.items() if k != "examples")
                      for name, s in scores.items())


def task_paths(spec):
    """Task files from a comma-separated list of paths and globs."""
    paths = [p for part in spec.split(",") if part for p in (sorted(glob.glob(part)) or [part])]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing or not paths:
        raise FileNotFoundError(f"no task file at {', '.join(missing) or repr(spec)}")
    return paths


if __name__ == "__main__":
    from infra.checkpoint import load_checkpoint, model_from_checkpoint
    from infra.device import resolve_device
    from data import open_dataset
    from infra.rundir import check_replaceable_file
    try:
        if out_file:
            scores_file = lambda v: isinstance(v, dict) and {"checkpoint", "step", "tasks"} <= set(v)
            check_replaceable_file(out_file, scores_file, "a scores file evaluate.py wrote", "out_file")
        device, device_type, dtype, autocast = resolve_device(device, dtype)
        checkpoint = load_checkpoint(ckpt)
        loaded = [load_task(path, examples) for path in task_paths(tasks)] if tasks else []
        block_size = checkpoint["model_args"]["block_size"]
        val_sets = [open_dataset(d, block_size) for d in val_data.split(",") if d]
        for dataset in val_sets:
            if not tok.same_ids(tok.tokenizer_state(tok.load_tokenizer(dataset.directory)), checkpoint["tokenizer"]):
                raise ValueError(f"{dataset.directory} is tokenized with another tokenizer than {checkpoint['path']}")
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"evaluate.py: error: {e}")
    model, encoder = model_from_checkpoint(checkpoint, device)
    model.eval()
    scores = evaluate_tasks(model, encoder, loaded, block_size=model.args.block_size, micro_batch_size=micro_batch_size,
                            device=device, autocast=autocast)
    print(f"# {checkpoint['path']} (step {checkpoint['step']})")
    if val_sets:
        windows = validation_windows(
            val_sets,
            micro_batches=0,
            micro_batch_size=micro_batch_size,
            block_size=block_size,
            seed=0,
            rank=0,
            world_size=1,
            full_pass=True,
        )
        token_bytes = torch.from_numpy(tok.token_byte_lengths(encoder)).to(device)
        per_dataset, _ = validation(model, val_sets, windows, weights=np.full(len(val_sets), 1 / len(val_sets)),
                                    block_size=block_size, token_bytes=token_bytes, device=device, autocast=autocast)
        for name, (loss, bpb) in per_dataset.items():
            print(f"{name:>24}  val loss {loss:.4f}  {bpb:.4f} bits per byte (every val token once)")
        val_scores = {name: {"loss": loss, "bpb": bpb} for name, (loss, bpb) in per_dataset.items()}
    for name, metrics in scores.items():
        print(
            f"{name:>24}  "
            + "  ".join(f"{k} {v:.4f}" if k != "examples" else f"({v} examples)" for k, v in metrics.items())
        )
    if out_file:  # whole or not at all
        with open(out_file + ".tmp", "w") as f:
            json.dump({"checkpoint": checkpoint["path"], "step": checkpoint["step"], "tasks": scores,
                       **({"val": val_scores} if val_sets else {})}, f, indent=1)
        os.replace(out_file + ".tmp", out_file)
