"""The weights a run starts from, whole, as parallel.wrap leaves them: python tests/initial_weights.py
MODE OUT.safetensors, alone or under torchrun (tests/test_fsdp.py compares modes and world sizes)."""
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import GPT, ModelArgs  # noqa: E402
from infra.parallel import wrap  # noqa: E402

mode, out = sys.argv[1], sys.argv[2]
if "RANK" in os.environ:
    dist.init_process_group("gloo")
world_size = dist.get_world_size() if dist.is_initialized() else 1
with torch.device("meta"):  # 3 layers and 300 tokens: row counts that 2 ranks do not split evenly
    model = GPT(ModelArgs(vocab_size=300, block_size=16, n_layer=3, n_head=4, n_kv_head=2, n_embd=48))
wrap(model, mode=mode, device="cpu", local_rank=0, world_size=world_size, shard_size=world_size, compile=False,
     bf16=False, reshard_after_forward=True, seed=1337)
whole = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}
if not dist.is_initialized() or dist.get_rank() == 0:
    from safetensors.torch import save_file
    save_file(whole, out)
if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo's teardown at exit can abort a finished process (train.py says more)
