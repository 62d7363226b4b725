"""Three Muon steps on a small model's hidden matrices, with the same gradients on every rank;
saves the parameters to the path given as argv[1] (rank 0). Run single-process or under torchrun."""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import GPT, ModelArgs
from muon import Muon


def run(out_path):
    torch.manual_seed(0)
    model = GPT(ModelArgs(vocab_size=128, block_size=16, n_layer=3, n_head=4, n_kv_head=2, n_embd=32))
    hidden = [p for name, p in model.named_parameters() if name.startswith("layers.") and p.dim() == 2]
    optimizer = Muon(hidden, lr=0.01, weight_decay=0.1)
    for step in range(3):
        generator = torch.Generator().manual_seed(100 + step)
        for p in hidden:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
    state = optimizer.state_dict()  # gathered from every rank's share (a collective)
    if dist.is_initialized():  # each rank holds the momentum of its share only
        assert 0 < len(optimizer.state) < len(hidden), len(optimizer.state)
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save({"params": [p.detach().clone() for p in hidden],
                    "momentum": [state["state"][i]["momentum_buffer"] for i in range(len(hidden))]}, out_path)


if __name__ == "__main__":
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    run(sys.argv[1])
    if dist.is_initialized():
        dist.barrier()  # leave together, and without Python's exit, as train.py does (gloo can abort there)
        dist.destroy_process_group()
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(0)
