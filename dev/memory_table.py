"""
An estimate of the GPU memory per rank in each data-parallel mode, for BENCHMARKS.md's table:
    python dev/memory_table.py                       # the 1B config and a Llama-3-8B shape on 8 GPUs
    python dev/memory_table.py --gpus=16 --shard_size=8
The training state is counted exactly (bytes per parameter, as parallel.state_bytes measures them);
the activations a micro-batch keeps for the backward pass are measured on the CPU, as the bytes of
every tensor autograd saves in one bf16-autocast forward of the real widths (one and two blocks,
two sequence lengths: the per-token and per-block parts apart), so they follow model.py as it is;
and the loss's chunk of logits in flight at the end of the forward pass.
Not counted: the CUDA context, NCCL's buffers, the allocator's fragmentation and the backward's
transient gradients of activations (a few GB in all), and torch.compile's fusions, which keep less.
"""
from concurrent.futures import ProcessPoolExecutor
import multiprocessing
import os
import sys

import torch

gpus = 8
shard_size = 8                  # hsdp: the ranks of one sharded group (a node)
memory_gb = 80
exec(open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configurator.py")).read())

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import GPT, ModelArgs  # noqa: E402

SHAPES = {  # name: (model, micro-batch), as configs/pretrain.py and Llama-3-8B
    "1B (configs/pretrain.py)": (
        dict(vocab_size=50264, block_size=2048, n_layer=20, n_head=32, n_kv_head=8, n_embd=2048),
        8,
    ),
    "Llama-3-8B shape": (
        dict(
            vocab_size=128256,
            block_size=8192,
            n_layer=32,
            n_head=32,
            n_kv_head=8,
            n_embd=4096,
            mlp_ratio=3.5,
            rope_base=500000.0,
        ),
        1,
    ),
}


def saved_bytes(args, n_layer, length):
    """The bytes autograd keeps after one bf16-autocast forward (and loss) of one sequence."""
    torch.manual_seed(0)
    # train.py's default loss_chunk_tokens: the loss keeps its gradients, not the logits
    model = GPT(ModelArgs(**{**args, "n_layer": n_layer, "block_size": length}), loss_chunk_tokens=4096)
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t
    idx = torch.randint(0, args["vocab_size"], (1, length))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
        model(idx, idx, loss_reduction="sum")
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for (ptr, _), n in seen.items() if ptr not in params)  # the weights themselves are counted apart


def measured(args, n_layer, length):
    """saved_bytes in a process of its own: the memory of a large model's run is then surely returned."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(saved_bytes, args, n_layer, length).result()


def activations(args):
    """(bytes per token per block, per token for the embedding, head and loss, per block that do not
    depend on the length: autocast's bf16 copies of its weights). The blocks measured with a small
    vocabulary (they do not depend on it: less memory here), the rest with the real one."""
    a, b = 64, 128
    small = {**args, "vocab_size": 512}
    one, two, one_b, two_b = (measured(small, n, length) for length in (a, b) for n in (1, 2))
    per_block_token = ((two_b - one_b) - (two - one)) / (b - a)
    per_block_fixed = (two - one) - per_block_token * a
    rest_token = (measured(args, 1, b) - measured(args, 1, a)) / (b - a) - per_block_token
    return per_block_token, rest_token, per_block_fixed


def table():
    GB = 1e9
    rows = []
    for name, (args, micro) in SHAPES.items():
        with torch.device("meta"):
            model = GPT(ModelArgs(**args))
        P = model.num_params()
        L, T = args["n_layer"], args["block_size"]
        block = sum(p.numel() for p in model.layers[0].parameters())
        root = P - L * block  # the embedding, the head and the final norm: FSDP2's root unit
        per_token, rest_token, block_copies = activations(args)
        tokens = micro * T
        # the loss's chunk in flight at the end of the forward: its fp32 softmax and bf16 copy (model.py;
        # measured on the CPU as peak RSS: 1.26 GB at 4096 x 50,264, 3.21 GB at 4096 x 128,256)
        loss_chunk = 6 * min(4096, tokens) * model.args.padded_vocab_size
        act = (L * per_token + rest_token) * tokens + loss_chunk
        act_ckpt = (L * 4 * args["n_embd"] + per_token + rest_token) * tokens + loss_chunk  # fp32 inputs, one block
        ddp = 16 * P + L * block_copies + act  # + autocast's bf16 weights (the gradients are views of DDP's buckets)
        # FSDP2: its 1/N of the fp32 state; in flight two blocks gathered in bf16 (this and the prefetched
        # one) and one block's fp32 gradients before the reduce-scatter; the root's bf16 weights gathered
        # for the whole step, and its gradient unsharded for a moment
        fsdp_transient = 2 * 2 * block + 4 * block + 2 * root + 4 * root
        fsdp = 16 * P / gpus + fsdp_transient + act
        fsdp_no_reshard = fsdp + 2 * L * block  # every block stays gathered from its forward to its backward
        hsdp = 16 * P / shard_size + fsdp_transient + act
        for mode, total in [("ddp", ddp), ("fsdp", fsdp), ("fsdp, reshard_after_forward=False", fsdp_no_reshard),
                            ("fsdp + activation_checkpointing", fsdp - act + act_ckpt),
                            (f"hsdp, any number of nodes of {shard_size}", hsdp)]:
            rows.append(
                (
                    name,
                    f"{P / 1e9:.2f}B",
                    micro,
                    T,
                    mode,
                    total / GB,
                    act / GB if "checkpointing" not in mode else act_ckpt / GB,
                )
            )
    print(f"| model | parameters | micro-batch x sequence | mode | GB per GPU ({gpus} GPUs) | of which activations "
          f"| fits {memory_gb} GB |")
    print("|---|---|---|---|---|---|---|")
    for name, params, micro, T, mode, total, act in rows:
        fits = "yes" if total < memory_gb * 0.93 else "no"
        print(f"| {name} | {params} | {micro} x {T} | {mode} | {total:.0f} | {act:.0f} | {fits} |")


if __name__ == "__main__":
    table()
