"""
Evaluation: how good the model is, during training (train.py calls these).

Validation loss and bits per byte, per dataset, on the same held-out windows at every evaluation.
In chat datasets only the learned targets (the assistant's words) count. Bits per byte does not
depend on the tokenizer: the loss in bits summed over the UTF-8 bytes the targets stand for
(special tokens excluded).
"""
import math

import numpy as np
import torch
import torch.distributed as dist

from data import read_windows, sample_windows


def validation_windows(datasets, micro_batches, micro_batch_size, seed, rank, world_size):
    """This rank's validation windows of each dataset, as micro-batches of windows: micro_batches x
    micro_batch_size windows in all, the same set whatever the world size, split between ranks. A
    share is padded with None windows (nothing learned) to whole micro-batches, the same number on
    every rank: each runs the same forward passes (FSDP needs that). Drawn with the key
    (seed, 2**32, d): a step number training never reaches, so never the windows of a training step."""
    total = micro_batches * micro_batch_size
    per_rank = -(-total // world_size)
    per_rank = -(-per_rank // micro_batch_size) * micro_batch_size
    shares = []
    for d in range(len(datasets)):
        windows = sample_windows([datasets[d]], [1.0], "val", total, (seed, 2**32, d))
        mine = [(d, shard, offset) for _, shard, offset in windows[rank * per_rank:(rank + 1) * per_rank]]
        mine += [None] * (per_rank - len(mine))
        shares.append([mine[k:k + micro_batch_size] for k in range(0, per_rank, micro_batch_size)])
    return shares


@torch.no_grad()
def validation(model, datasets, windows, weights, block_size, token_bytes, device, autocast):
    """({dataset directory: (mean loss per learned target, bits per byte)}, their weighted mean),
    summed over every rank's windows (a collective when there are several)."""
    model.eval()
    results = {}
    for dataset, micro_batches in zip(datasets, windows):
        zero = torch.zeros((), device=device, dtype=torch.float64)
        loss_sum, target_count, byte_loss_sum, byte_count = zero, zero, zero, zero  # summed on the device
        for micro_batch in micro_batches:
            x, y = (torch.from_numpy(a).to(device) for a in read_windows(datasets, "val", micro_batch, block_size, True))
            with autocast:
                losses = model(x, y, loss_reduction="none").double()  # 0 where the target is -1
            nbytes = token_bytes[y.clamp(min=0)] * (y >= 0)  # 0 for special tokens too
            loss_sum, target_count = loss_sum + losses.sum(), target_count + (y >= 0).sum()
            byte_loss_sum, byte_count = byte_loss_sum + (losses * (nbytes > 0)).sum(), byte_count + nbytes.sum()
        totals = torch.stack([loss_sum, target_count, byte_loss_sum, byte_count])
        if dist.is_initialized():
            dist.all_reduce(totals)
        loss_sum, target_count, byte_loss_sum, byte_count = totals.tolist()
        results[dataset["directory"]] = (loss_sum / max(target_count, 1), byte_loss_sum / (math.log(2) * max(byte_count, 1)))
    model.train()
    mean = tuple(float(np.dot(weights, [r[i] for r in results.values()])) for i in range(2))
    return results, mean
