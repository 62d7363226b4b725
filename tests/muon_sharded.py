"""Three Muon steps on a small model's hidden matrices, with the same gradients on every rank; the
parameters and Muon's momentum saved as a checkpoint in the directory argv[1]. argv[2]: 'ddp'
(replicated matrices, each rank orthogonalizing its share) or 'fsdp' (FSDP2 shards); argv[3], if
given: 'neuron_norm' (NorMuon). Run single-process or under torchrun."""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from infra.checkpoint import save_checkpoint
from conftest import checkpoint_meta
from model import GPT, ModelArgs
from muon import Muon
from infra.resume import state_pieces
from infra.parallel import wrap


def run(out_dir, mode, neuron_norm):
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    torch.manual_seed(0)
    model = GPT(ModelArgs(vocab_size=128, block_size=16, n_layer=3, n_head=4, n_kv_head=2, n_embd=32))
    _, group = wrap(model, mode=mode if dist.is_initialized() else "ddp", device="cpu", local_rank=0,
                    world_size=world_size, shard_size=world_size, compile=False, bf16=False, reshard_after_forward=True,
                    seed=0)
    hidden = [p for name, p in model.named_parameters() if name.startswith("layers.") and p.dim() == 2]
    optimizer = Muon(hidden, lr=0.01, weight_decay=0.1, ns_steps=5, neuron_norm=neuron_norm, group=group)
    # the rest on AdamW, as in training: a checkpoint holds every parameter's optimizer state
    adamw = torch.optim.AdamW([p for p in model.parameters() if not any(p is h for h in hidden)], lr=0.01)
    for step in range(3):
        generator = torch.Generator().manual_seed(100 + step)
        for p in model.parameters():
            grad = torch.randn(p.shape, generator=generator)
            if hasattr(p, "device_mesh"):  # an FSDP2 parameter's gradient is sharded as it is
                from torch.distributed.tensor import distribute_tensor
                grad = distribute_tensor(grad, p.device_mesh, p.placements)
            p.grad = grad
        optimizer.step()
        adamw.step()
    kept = sum(state["momentum_buffer"].numel() for state in optimizer.state.values())
    print(f"rank {rank}: momentum elements kept {kept} of {sum(p.numel() for p in hidden)}", flush=True)
    save_checkpoint(out_dir, 3, state_pieces(model, {"adamw": adamw, "muon": optimizer}, rank, world_size),
                    checkpoint_meta(model, 3) if rank == 0 else None, rank=rank, world_size=world_size)


if __name__ == "__main__":
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    run(sys.argv[1], sys.argv[2], sys.argv[3:] == ["neuron_norm"])
    if dist.is_initialized():
        dist.barrier()  # leave together, and without Python's exit, as train.py does (gloo can abort there)
        dist.destroy_process_group()
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(0)
