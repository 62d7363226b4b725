"""
Where a run starts, and the training state its checkpoints hold (the format itself: checkpoint.py).
    start_point          resume, a stage handoff or scratch, and what is refused (the rule is its
                         docstring); start_counters, the step, tokens and parent it starts with
    model_args_for       the model's shape: the start checkpoint's, else the config's
    save_training_state  the training state of every rank written, unless the run diverged (the
                         health rule: DIVERGED_NATS), with training_meta's record of the run
    state_pieces,        the training state by tensor name: model/<parameter>, adamw/<parameter>/<key>,
    load_state           muon/<parameter>/<key>; each rank writes and reads only the rows it holds
"""
import json
import math
import os
import time

import torch

from infra.checkpoint import (checkpoint_path, checkpoint_paths, open_checkpoint, remove_stale_writes,
                              save_checkpoint, set_aside_paths)
from infra.parallel import finite, replica, rows_held, share_to_write
from infra.rundir import Refused, lock_run_directory
from model import ModelArgs, check_model_args
import tokenizer as tok


class Finished(Exception):
    """A run resumed at its max_iters: nothing to train, and nothing is written."""


def start_point(out_dir, init_from, *, max_iters, use_muon, init_from_unfinished, master, barrier):
    """Where training starts: (source, read, resuming), source and read as checkpoint.open_checkpoint
    gives them, or None, None for a fresh model. Rank 0 first locks out_dir: one run per directory, a
    second is refused, naming the first's PID. The rule:
    - a run directory that holds checkpoints is resumed, never overwritten: by 'resume', and by a
      stage handoff too (so rerunning a pipeline resumes each stage); 'scratch' over it is refused;
      resuming, rank 0 first finds the newest checkpoint that loads with finite weights, setting
      aside those that do not (every rank then opens that one: barrier() between);
    - a directory of set-aside checkpoints only is refused, never trained over from step 0;
    - otherwise 'resume' starts from scratch, and a handoff (an earlier stage's out_dir or checkpoint,
      or hf:<dir>) takes that model's weights only, and only from a stage that finished (its newest
      checkpoint at the max_iters it ran with) unless init_from_unfinished.
    A run already at or past max_iters raises Finished (at it) or Refused (past it): nothing to train."""
    if master:
        lock_run_directory(out_dir)
        remove_stale_writes(out_dir)
    resuming = bool(checkpoint_paths(out_dir))
    if not resuming and set_aside_paths(out_dir):
        raise Refused(f"{out_dir} holds no checkpoint that loads, only ones set aside as corrupt "
                      f"({', '.join(map(os.path.basename, set_aside_paths(out_dir)))}): move them out of {out_dir} "
                      f"to start it again from scratch, or choose a new --out_dir")
    if resuming and init_from == "scratch":
        raise Refused(f"{out_dir} already holds checkpoints ({os.path.basename(checkpoint_paths(out_dir)[-1])}): "
                      f"continue with --init_from=resume, or choose a new --out_dir")
    if resuming and init_from != "resume" and master:
        print(f"{out_dir} already holds this stage's checkpoints: resuming it (not starting again from {init_from})",
              flush=True)
    source = read = None
    try:
        if resuming and master:
            source, read = open_checkpoint(out_dir, set_aside_corrupt=True, verify=True)
        barrier()
        if source is None and (resuming or init_from not in ("scratch", "resume")):
            source, read = open_checkpoint(out_dir if resuming else init_from)
    except (ValueError, FileNotFoundError) as e:
        raise Refused(str(e)) from None
    if resuming and (foreign := _foreign_shape(out_dir, source)):
        raise Refused(f"{source['path']} is a model of another shape than {foreign}: it is not this run's "
                      f"checkpoint; move it out of {out_dir} to resume the run")
    if resuming and source["step"] > max_iters:
        raise Refused(f"{source['path']} is at step {source['step']}, past max_iters={max_iters}: nothing to train and "
                      f"nothing written; resume with --max_iters={source['config'].get('max_iters', source['step'])} "
                      f"or more")
    if resuming and source["step"] == max_iters:
        raise Finished(f"{out_dir} is finished ({os.path.basename(source['path'])} is at max_iters={max_iters}): "
                       f"nothing to train; raise --max_iters to train on")
    if resuming and bool(source["config"].get("use_muon")) != use_muon:
        raise Refused(f"{source['path']} was trained with use_muon={source['config'].get('use_muon')}: use_muon must "
                      f"stay as it was")
    planned = source["config"].get("max_iters") if source is not None and not resuming else None
    if isinstance(planned, int) and source["step"] < planned and not init_from_unfinished:
        raise Refused(
            f"{source['path']} stopped at step {source['step']} of its max_iters={planned}: finish that stage "
            f"first (run it again with --init_from=resume), or start from it anyway with "
            f"--init_from_unfinished=True"
        )
    if init_from == "resume" and source is None and master:
        print(f"no checkpoint in {out_dir}: starting from scratch", flush=True)
    return source, read, resuming


def _foreign_shape(out_dir, source):
    """None, or what says that source is not this run's: a run's checkpoints all have one model shape
    (meta.json's model_args), so one of another shape beside them was copied in from elsewhere."""
    for path in checkpoint_paths(out_dir):
        try:
            with open(os.path.join(path, "meta.json")) as f:
                args = json.load(f)["model_args"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not loadable: it never counts
        if path != source["path"] and args != source["model_args"]:
            ours = source["model_args"]
            differences = [f"{k}={ours.get(k)} against {args.get(k)}"
                           for k in sorted(set(ours) | set(args)) if ours.get(k) != args.get(k)]
            return f"{os.path.basename(path)} beside it: {', '.join(differences)}"
    return None


def start_counters(source, resuming):
    """(step, tokens_seen, parent, good_checkpoint, best_val_loss) at the start. parent is the checkpoint
    the run's weights came from; good_checkpoint is the newest of this run known to hold finite weights
    and evaluation; best_val_loss the run's lowest so far (a checkpoint far above it is refused:
    DIVERGED_NATS). A resumed run takes all five from its checkpoint; a handoff starts at step 0 with
    that checkpoint as parent."""
    if source is None:
        return 0, 0, None, None, None
    if resuming:
        return source["step"], source["tokens_seen"], source["parent"], source["path"], source.get("best_val_loss")
    return 0, 0, source["path"], None, None


def shape_from_start(source, config):
    """The model settings of config that the start checkpoint overrides, {name: its value}: the model's
    shape is the checkpoint's, so a later stage's config need not repeat it (vocab_size 0 means the data's)."""
    if source is None:
        return {}
    return {k: v for k, v in source["model_args"].items() if k in config and config[k] != v
            and not (k == "vocab_size" and config[k] == 0)}


def model_args_for(start, settings, *, tokenizer, data_vocab, data_dir):
    """The model's shape: the start checkpoint's when there is one (a later stage's config need not
    repeat it), else settings' (train.py's config; vocab_size 0 is the data's). ValueError for a start
    checkpoint whose tokenizer is not the data's, or a vocabulary smaller than the data's."""
    if start is None:
        shape = {k: settings[k] for k in ModelArgs.__dataclass_fields__ if k in settings}
        args = ModelArgs(**{**shape, "vocab_size": shape["vocab_size"] or data_vocab})
    else:
        args = ModelArgs(**start["model_args"])
        if not tok.same_ids(start["tokenizer"], tokenizer):
            its_data = (start["path"] if str(start["path"]).startswith("hf:") else start.get("data_dir")
                        or "<the dataset it was trained on>")
            raise ValueError(f"{start['path']} was trained with another tokenizer "
                             f"({tok.tokenizer_label(start['tokenizer'])}) than {data_dir}'s "
                             f"({tok.tokenizer_label(tokenizer)}): its weights mean other token ids. If it is not "
                             f"the model you meant to start from, name yours with --init_from (configs/tiny.py "
                             f"starts a later stage from the demo's run); if it is, prepare {data_dir} again with "
                             f"--tokenizer={its_data}")
    if args.vocab_size < data_vocab:
        raise ValueError(f"vocab_size={args.vocab_size} is smaller than the dataset's vocabulary ({data_vocab}); "
                         "use 0 to take it from the data")
    return check_model_args(args)


DIVERGED_NATS = 1.0  # a val loss this far above the run's best: the run has diverged (README, "Checkpoints")


def training_meta(*, step, tokens_seen, batch_size, model_args, config, tokenizer, data_dir, parent, val_loss=None,
                  best_val_loss=None):
    """meta.json's keys besides the tensor index: what a checkpoint records of its run (val_loss: the
    evaluation at its step; best_val_loss: the run's lowest so far, which a resume carries on)."""
    return {"step": step, "tokens_seen": tokens_seen, "batch_size": batch_size, "model_args": model_args,
            "config": config, "tokenizer": tokenizer, "data_dir": data_dir, "parent": parent, "val_loss": val_loss,
            "best_val_loss": best_val_loss}


def save_training_state(gpt, optimizers, meta, *, out_dir, val_loss, good_checkpoint, rank, world_size, keep_last,
                        keep_every):
    """Every rank's share of the training state written in the background (save_checkpoint), meta on
    rank 0; returns the checkpoint's path. Weights or an evaluation that are not finite are refused
    (ValueError, naming good_checkpoint), and so is a val loss more than DIVERGED_NATS above the run's
    best so far (meta's best_val_loss before this evaluation): a diverged run stops rather than rotate
    its good checkpoints away, whether its loss went non-finite or only very large."""
    started, step = time.time(), meta["step"]
    weights_finite = finite(gpt)  # a host sync (and a collective), here only
    best = meta.get("best_val_loss")
    diverged = val_loss is not None and best is not None and val_loss > best + DIVERGED_NATS
    if not weights_finite or (val_loss is not None and not math.isfinite(val_loss)) or diverged:
        raise ValueError(f"checkpoint at step {step} refused: "
                         + ("the weights are not finite" if not weights_finite else
                            f"val loss {val_loss:.4g}, more than {DIVERGED_NATS:g} nat above the run's best "
                            f"({best:.4g}): the run diverged" if diverged else f"val loss {val_loss}")
                         + f"; the newest good checkpoint is {good_checkpoint or 'none (nothing was written)'}: "
                         "resume from it with a lower learning rate")
    meta["best_val_loss"] = min(best, val_loss) if best is not None and val_loss is not None else \
        (val_loss if best is None else best)
    pieces = state_pieces(gpt, optimizers, rank, world_size)
    save_checkpoint(out_dir, step, pieces, meta if rank == 0 else None, rank=rank, world_size=world_size,
                    keep_last=keep_last, keep_every=keep_every, background=True)
    if rank == 0:
        host_mb = sum(t.numel() * t.element_size() for t, _, _ in pieces.values()) / 2**20
        print(f"checkpoint at step {step}: training paused {time.time() - started:.2f}s, {host_mb:,.1f} MiB of "
              f"rank 0's state in host memory (written in the background)", flush=True)
    return checkpoint_path(out_dir, step)


def state_pieces(raw_model, optimizers, rank, world_size):
    """This rank's share of the training state, by tensor name, for save_checkpoint: {name: (tensor,
    first row, full shape)}. optimizers: {name: optimizer}, whose state is named <name>/<parameter>/<key>:
    the rows parallel.share_to_write gives this rank of a state shaped as its parameter (AdamW's), or
    the part an optimizer that places its own state keeps (its state_rows: Muon's)."""
    pieces = {}

    def add(name, tensor):
        share = share_to_write(tensor, rank, world_size)
        if share is not None:
            pieces[name] = (share[0].detach(), share[1], tuple(tensor.shape))

    for name, p in raw_model.named_parameters():
        add(f"model/{name}", p)
        for kind, opt in optimizers.items():
            if not hasattr(opt, "state_rows"):  # its state is shaped as p is
                for key, value in opt.state.get(p, {}).items():
                    add(f"{kind}/{name}/{key}", value)
            elif not replica(p):  # the part of its state this rank keeps, placed as the optimizer says
                pieces.update({f"{kind}/{name}/{key}": piece for key, piece in opt.state_rows(p).items()})
    return pieces


@torch.no_grad()
def load_state(read, tensors, raw_model, optimizers, device):
    """Set raw_model's weights and, when given ({name: optimizer}), the optimizers' state from a checkpoint
    opened with open_checkpoint (read, and its list of tensor names): each rank reads the rows it holds."""
    def rows(name, like):
        part, first = rows_held(like)
        return read(name) if like.dim() == 0 else read(name, first, first + part.shape[0])

    for name, p in raw_model.named_parameters():
        rows_held(p)[0].copy_(rows(f"model/{name}", p))
        for kind, opt in optimizers.items():
            keys = [t.rsplit("/", 1)[1] for t in tensors if t.startswith(f"{kind}/{name}/")]
            if hasattr(opt, "load_state_rows") and keys:  # the rows this rank keeps (muon.py)
                opt.load_state_rows(p, lambda key, first, last: read(f"{kind}/{name}/{key}", first, last).to(device),
                                    keys)
            elif keys:
                state = {}
                for key in keys:
                    like = torch.zeros((), dtype=torch.float32, device=device) if key == "step" else torch.zeros_like(p)
                    rows_held(like)[0].copy_(rows(f"{kind}/{name}/{key}", like))
                    state[key] = like
                opt.state[p] = state
