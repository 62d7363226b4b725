"""
A run's report: Markdown and PNG plots from its metrics.jsonl and those of the stages it started from.
    python report.py out/finetune-tiny                 # -> out/finetune-tiny/report/report.md
    python report.py out/finetune --out=reports/ft
The chain of stages follows each run's parent checkpoint (pretrain -> midtrain -> finetune). The plots,
against tokens seen over the whole chain: train and val loss, the learning rate, tokens/s and MFU,
the downstream tasks' scores with their chance level. The text: each stage's config, model size,
hardware, wall time and final numbers. The plots need matplotlib (pip install matplotlib); without
it, report.md has the text alone and says how to add them.
"""
import json
import os
import sys

# ----------------------------------------------------------------------------------------------
sources = []                    # the run directory to report on (a plain argument); its parents come along
out = ""                        # where report.md and the plots go; '': <run directory>/report
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
# ----------------------------------------------------------------------------------------------

SHOWN = [
    "n_layer",
    "n_head",
    "n_kv_head",
    "n_embd",
    "block_size",
    "batch_size",
    "micro_batch_size",
    "max_iters",
    "learning_rate",
    "min_lr",
    "lr_schedule",
    "warmup_iters",
    "use_muon",
    "data_dir",
    "data_mixture",
    "use_loss_mask",
    "init_from",
    "eval_tasks",
]


def stage(run_dir):
    """A run directory's records: the config and run of the last start that trained, the parent of the
    first, every step's metrics, and the wall time of its runs (each from its start to its last
    record: the gaps between runs are not counted)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        sys.exit(f"report.py: error: no metrics.jsonl in {run_dir}")
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    runs = []  # each start's records, from its {"config", "run"} record on
    for r in records:
        if "config" in r or not runs:
            runs.append([])
        runs[-1].append(r)
    trained = [run for run in runs if any("step" in r for r in run)] or runs
    times = [[r["time"] for r in run if "time" in r] for run in runs]
    return {"dir": run_dir, "config": trained[-1][0].get("config", {}), "run": trained[-1][0].get("run", {}),
            "first": runs[0][0].get("run", {}), "records": [r for r in records if "step" in r],
            "wall_s": sum(t[-1] - t[0] for t in times if len(t) > 1)}


def chain(run_dir):
    """The stages that led to run_dir, first to last, through each run's parent checkpoint."""
    stages = [stage(run_dir)]
    while (parent := stages[0]["first"].get("parent")) and not parent.startswith("hf:"):
        parent_dir = os.path.dirname(parent)
        if not os.path.isfile(os.path.join(parent_dir, "metrics.jsonl")) or len(stages) > 20:
            break
        stages.insert(0, stage(parent_dir))
    return stages


def start_offsets(stages):
    """Where each stage starts on the chain's token axis: at the tokens of the checkpoint it started
    from (a stage may start from one before the end of the stage before it), the first at 0."""
    offsets = [0]
    for before, s in zip(stages, stages[1:]):
        parent = s["first"].get("parent") or ""
        step = (
            int(parent.rsplit("ckpt_", 1)[1]) if "ckpt_" in parent and parent.rsplit("ckpt_", 1)[1].isdigit() else None
        )
        tokens = [r["tokens"] for r in before["records"] if "tokens" in r and (step is None or r["step"] <= step)]
        offsets.append(offsets[-1] + max(tokens or [0]))
    return offsets


def plot(stages, directory, plt):
    """The PNGs, against tokens seen since the first stage; dotted lines where a stage begins."""
    offsets = start_offsets(stages)
    total = max(offset + max([r.get("tokens", 0) for r in s["records"]] or [0]) for s, offset in zip(stages, offsets))

    def series(key, records_of=lambda s: s["records"]):
        return [
            (
                [offset + r["tokens"] for r in records_of(s) if key(r) is not None],
                [key(r) for r in records_of(s) if key(r) is not None],
                os.path.basename(s["dir"].rstrip("/")),
            )
            for s, offset in zip(stages, offsets)
        ]

    def data_of(s):  # what a stage's val loss is measured on
        config = s["config"]
        return ", ".join(
            os.path.basename(d.rstrip("/")) for d in (config.get("data_mixture") or [config.get("data_dir", "?")])
        )

    def figure(name, title, lines, ylabel, log_y=False):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for xs, ys, label in lines:
            if xs and label.endswith("chance"):
                ax.plot(xs, ys, label=label, linestyle="--", linewidth=1)
            elif xs:
                ax.plot(xs, ys, label=label, marker="." if len(xs) < 30 else None)
        for offset in offsets[1:]:
            ax.axvline(offset, color="gray", linestyle=":", linewidth=1)
        ax.set(title=title, xlabel="tokens", ylabel=ylabel)
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(directory, name), dpi=100)
        plt.close(fig)
        return name

    # each stage's val loss is on its own data's val split: labelled with it, not comparable across stages
    val = [
        (x, y, f"{label} val ({data_of(s)})") for (x, y, label), s in zip(series(lambda r: r.get("val_loss")), stages)
    ]
    pngs = [
        figure(
            "loss.png",
            "loss (each val curve on its own stage's data)",
            [(x, y, f"{label} train") for x, y, label in series(lambda r: r.get("loss"))] + val,
            "nats per token",
        ),
        figure("lr.png", "learning rate", series(lambda r: r.get("lr")), "learning rate"),
        figure("throughput.png", "tokens per second", series(lambda r: r.get("tokens_per_s")), "tokens/s"),
    ]
    if any(r.get("mfu") for s in stages for r in s["records"]):
        pngs.append(figure("mfu.png", "model FLOPs utilization", series(lambda r: r.get("mfu")), "MFU"))
    tasks = sorted({name for s in stages for r in s["records"] for name in r.get("tasks", {})})
    if tasks:
        lines, chances = [], {}
        for name in tasks:
            metrics = [m for m in ("acc", "acc_norm", "exact_match")
                       if any(m in r.get("tasks", {}).get(name, {}) for s in stages for r in s["records"])]
            for metric in metrics:
                points = series(lambda r: r.get("tasks", {}).get(name, {}).get(metric))
                lines.append(
                    ([x for xs, _, _ in points for x in xs], [y for _, ys, _ in points for y in ys], f"{name} {metric}")
                )
            chance = [
                r["tasks"][name]["chance"]
                for s in stages
                for r in s["records"]
                if "chance" in r.get("tasks", {}).get(name, {})
            ]
            if chance:  # tasks with the same chance level share one line, labelled with all their names
                chances.setdefault(round(chance[-1], 6), []).append(name)
        lines += [([0, total], [level] * 2, f"{' and '.join(names)} chance") for level, names in chances.items()]
        pngs.append(figure("tasks.png", "downstream tasks", lines, "score"))
    return pngs


def markdown(stages, pngs):
    lines = [f"# Run report: {stages[-1]['dir']}", ""]
    for s in stages:
        run, config, records = s["run"], s["config"], s["records"]
        last = lambda key: next((r for r in reversed(records) if key in r), None)  # noqa: E731
        wall = s["wall_s"]
        lines += [
            f"## {s['dir']}",
            "",
            f"- model: {run.get('params', 0) / 1e6:,.2f}M parameters; hardware: {run.get('device', '?')}, world size "
            f"{run.get('world_size', '?')}, {run.get('dtype', '?')}, compile={run.get('compile', '?')}, "
            f"torch {run.get('torch', '?')}",
            f"- started from: {s['first'].get('parent') or 'scratch'}; "
            f"steps: {max([r['step'] for r in records] or [0])}; "
            f"tokens: {max([r.get('tokens', 0) for r in records] or [0]):,}; wall time: {wall / 60:.1f} min (its runs, "
            f"without the gaps between them)",
        ]
        if last("loss"):
            r = last("loss")
            lines.append(f"- last log: step {r['step']}, loss {r['loss']:.4f}, {r['tokens_per_s']:,.0f} tokens/s"
                         + (f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") else ""))
        if last("val_loss"):
            r = last("val_loss")
            each = r.get("val_by_dataset", {})
            lines.append(f"- last evaluation: step {r['step']}, val loss {r['val_loss']:.4f}, "
                         f"{r['val_bpb']:.4f} bits per byte"
                         + "".join(f"; {name} {v['loss']:.4f}" for name, v in each.items() if len(each) > 1))
        if last("tasks"):
            r = last("tasks")
            scored = [f"{name} " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if k != "examples")
                      + f" ({scores['examples']} examples)" for name, scores in r["tasks"].items()]
            lines.append(f"- tasks at step {r['step']}: " + "; ".join(scored))
        lines += ["- config: " + ", ".join(f"`{k}={shown(config[k])}`" for k in SHOWN if k in config), ""]
    return "\n".join(lines + [f"![{name}]({name})" for name in pngs]) + "\n"


if __name__ == "__main__":
    if len(sources) != 1:
        sys.exit("report.py: error: name one run directory, e.g. python report.py out/finetune-tiny")
    stages = chain(sources[0])
    directory = out or os.path.join(sources[0], "report")
    os.makedirs(directory, exist_ok=True)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the text and its numbers need nothing more; only the plots do
        plt = None
    pngs = plot(stages, directory, plt) if plt else []
    no_plots = f"No plots: they need matplotlib (pip install matplotlib, then python report.py {sources[0]} again)."
    with open(os.path.join(directory, "report.md"), "w") as f:
        f.write(markdown(stages, pngs) + ("" if plt else "\n" + no_plots + "\n"))
    print(f"wrote {directory}/report.md and {len(pngs)} plots, over {len(stages)} stage(s): "
          + " -> ".join(s["dir"] for s in stages) + ("" if plt else "; " + no_plots))
