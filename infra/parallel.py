"""
Data parallelism: how train.py spreads training over several GPUs (torchrun sets RANK, LOCAL_RANK
and WORLD_SIZE), and which part of the training state each rank checkpoints and loads.

    data_parallel = 'ddp' (the default): every rank holds the whole model, its gradients and the
        optimizers' state (16 bytes per parameter with AdamW, before activations), and DDP
        all-reduces the gradients. The fastest while that fits.
    data_parallel = 'fsdp': FSDP2 (torch.distributed.fsdp.fully_shard) on each transformer block
        and on the root: parameters, gradients and optimizer state sharded across the ranks along
        their first dimension, each block's weights gathered just before it runs (and, with
        reshard_after_forward, again for its backward). On a GPU with bf16: bf16 parameters for the
        compute, fp32 gradient reduction, fp32 master weights. For models that do not fit with DDP.
    data_parallel = 'hsdp': FSDP2 within groups of shard_size ranks (a node's GPUs) that replicate
        each other (a 2-D device mesh, replicate x shard): the gathers stay inside a node, and only
        gradients cross nodes (all-reduced across the groups on the last micro-step).
Under FSDP2, torch.compile is applied to each block, as torchtitan does. Also here: which rows of
each tensor a rank holds, and which it writes in a checkpoint (checkpoint.py names and stores them).
"""

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from muon import row_range


def join_process_group(device, device_type, local_rank):
    """Under torchrun: this rank's device (cuda:LOCAL_RANK on CUDA), then the process group (NCCL on
    CUDA, gloo on the CPU). Its timeout turns a rank that died or hung into an error on the others
    instead of a hang."""
    from datetime import timedelta
    if device_type == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timedelta(minutes=10))
    return device


def wrap(raw_model, *, mode, device, local_rank, world_size, shard_size, compile, bf16, reshard_after_forward, seed,
         ddp_bucket_mb=None):
    """(the model to train, the process group whose ranks share Muon's work: None for the default).
    raw_model, built on the meta device, is given memory and initialised from seed (GPT.materialize):
    whole under DDP, only this rank's shards under FSDP2, with the same values either way. Then it is
    compiled and wrapped as the mode wants; under FSDP2 it is itself the sharded model. ddp_bucket_mb:
    DDP's gradient bucket size (None: torch's default, 25 MB)."""
    device_type = torch.device(device).type
    if mode == "ddp":
        raw_model.materialize(device, seed)
        # compile first, then wrap in DDP: DDP then hooks the compiled graph's gradients, and the
        # checkpoints come from raw_model, so their keys never carry _orig_mod. or module. prefixes
        model = torch.compile(raw_model) if compile else raw_model
        # under torchrun DDP wraps even one rank: what it costs is then there to be measured (dev/gpu_check.py).
        # Compiled, the graph is split where each gradient bucket ends (DDPOptimizer) so that its all-reduce
        # overlaps the rest of the backward: the bucket size sets how many graphs there are. The gradients
        # are views of the buckets (one copy less); the RoPE tables, the only buffers, need no broadcast.
        if not dist.is_initialized():
            return model, None
        buckets = {} if ddp_bucket_mb is None else {"bucket_cap_mb": ddp_bucket_mb}
        return DDP(model, device_ids=[local_rank] if device_type == "cuda" else None, gradient_as_bucket_view=True,
                   broadcast_buffers=False, **buckets), None
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    shape, names = (
        ((world_size,), ("shard",))
        if mode == "fsdp"
        else ((world_size // shard_size, shard_size), ("replicate", "shard"))
    )
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=names)
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    )
    for block in raw_model.layers:
        if compile:
            block.compile()
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(raw_model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    raw_model.materialize(device, seed)
    return raw_model, mesh.get_group("shard")


def sync_gradients(model, last):
    """Before each micro-step's backward. DDP all-reduces only on the last; FSDP2 reduce-scatters on
    every one (keeping each rank's gradients sharded) but, for HSDP, all-reduces across the replica
    groups only on the last."""
    if isinstance(model, DDP):
        model.require_backward_grad_sync = last
    elif hasattr(model, "set_requires_all_reduce"):
        model.set_requires_all_reduce(last)


def clip_grad_norm(parameters, max_norm):
    """The global gradient norm (a plain tensor) after clipping to max_norm; over every rank's shards
    under FSDP2, where torch computes it as a DTensor (tested: equal to one process's in fp32)."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def reshard(model):
    """Shard again what forward passes with no backward (evaluation) left gathered: FSDP2 frees a
    module's gathered weights after its backward, or after its forward with reshard_after_forward;
    until then the module's parameters are whole plain tensors, which neither the optimizers nor a
    checkpoint would recognise."""
    from torch.distributed.fsdp import FSDPModule
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def rows_held(tensor):
    """(the part of tensor this rank holds, its first row): a DTensor's shard (FSDP2 splits the first
    dimension as torch.chunk does), a plain tensor whole."""
    if not isinstance(tensor, DTensor):
        return tensor, 0
    mesh = tensor.device_mesh
    first, _ = row_range(tensor.shape[0], mesh.get_local_rank(mesh.ndim - 1), mesh.size(mesh.ndim - 1))
    return tensor.to_local(), first


def replica(tensor):
    """Whether tensor is, under HSDP, a shard that the first replica group's rank already holds."""
    return isinstance(tensor, DTensor) and tensor.device_mesh.ndim > 1 and tensor.device_mesh.get_local_rank(0) > 0


def share_to_write(tensor, rank, world_size):
    """(the rows of tensor this rank writes in a checkpoint, the first one's index), or None: its shard
    under FSDP2 (under HSDP, on the first replica group only); a slice of the rows of a replicated
    tensor (DDP), so that the ranks write it in parallel; a 0-d tensor on rank 0."""
    if replica(tensor) or (tensor.dim() == 0 and rank != 0):
        return None
    if isinstance(tensor, DTensor) or tensor.dim() == 0:
        return rows_held(tensor)
    first, last = row_range(tensor.shape[0], rank, world_size)
    return tensor[first:last], first


def finite(raw_model):
    """Whether every weight on every rank is finite (a host sync, and a collective with several ranks)."""
    flag = torch.stack([torch.isfinite(rows_held(p)[0]).all() for p in raw_model.parameters()]).all().float()
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def mean_over_ranks(tensor):
    """A number's mean over every rank (a host sync, and a collective with several ranks)."""
    if dist.is_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor)  # a sum: gloo has no average
        return tensor.item() / dist.get_world_size()
    return tensor.item()


def stop_agreed(requested, *, at_log_step, device):
    """Whether the run stops now on a stop request (a signal) that may have reached only some ranks:
    all ranks must stop at the same step, so with several they agree by a collective, at log steps
    only (no host sync in between); one process stops at once."""
    if not dist.is_initialized():
        return requested
    return at_log_step and mean_over_ranks(torch.tensor(float(requested), device=device)) > 0


def state_bytes(raw_model, optimizers):
    """The bytes of this rank's parameters, gradients and optimizer state ({name: optimizer}; the local
    shards under FSDP2)."""
    tensors = [t for p in raw_model.parameters() for t in (p, p.grad) if t is not None]
    tensors += [t for opt in optimizers.values() for state in opt.state.values() for t in state.values()
                if torch.is_tensor(t)]
    return sum(rows_held(t)[0].numel() * t.element_size() for t in tensors)


@torch.no_grad()
def found_inf_problem(optimizers, parameters):
    """None, or a sentence naming the first optimizer ({name: optimizer}) that does not skip its step
    when its found_inf attribute is a nonzero device scalar (train.py's divergence guard sets it on a
    step whose loss or gradients are not finite). Each is probed with one step on gradients of ones
    and found_inf = 1, every rank together: its weights must not move. The state an optimizer that
    honours found_inf creates in the probe is the zeros its first step would create anyway."""
    parameters = list(parameters)

    def fingerprint():  # (this rank's rows of each weight: an update moves them, a skipped step not one bit)
        return torch.stack([rows_held(p)[0].double().sum() for p in parameters])
    problem = None
    for name, opt in optimizers.items():
        held = {id(p) for group in opt.param_groups for p in group["params"]}
        for p in parameters:
            p.grad = torch.ones_like(p) if id(p) in held else None
        before, opt.found_inf = fingerprint(), torch.ones((), device=parameters[0].device)
        try:
            opt.step()
            moved = not torch.equal(fingerprint(), before)
        except Exception as e:  # (torch's unfused AdamW asserts that found_inf is None)
            moved, problem = True, f"the optimizer {name!r} ({type(opt).__name__}) fails with found_inf set: {e}"
        opt.found_inf = None
        if moved:
            problem = problem or f"the optimizer {name!r} ({type(opt).__name__}) ignores found_inf"
            break
    for p in parameters:
        p.grad = None
    return problem and (f"{problem}: a step with a non-finite loss would be applied; build it so that it skips "
                        f"its step when found_inf is nonzero (as torch's fused AdamW and muon.py do)")


def compiled_step_problem(model, raw_model, x, y, loss_scale, *, autocast, low_precision):
    """Whether the compiled model trains as the uncompiled one does, on this torch and this device: a
    sentence naming torch's version, the device and the first disagreement, or None (the same on every
    rank). One micro-batch goes through the compiled model, then through the uncompiled one with its
    loss negated, so that each gradient accumulates to compiled - uncompiled: every parameter's
    difference is measured whole, with no copy of the gradients. Compiler faults change numbers without
    an error (torch 2.11 zeroed the chunked loss's gradients): this is the minute-one check. No optimizer
    steps and the gradients are dropped, so training then starts exactly as it would without it.
    low_precision (bf16 or fp8): compiled kernels round differently, so within 5%; in fp32 (TF32 on
    CUDA) within 1%."""
    disagree = f"compiled and uncompiled training disagree with torch {torch.__version__} on {x.device}: "
    rtol = 0.05 if low_precision else 0.01

    def one_pass(sign):
        sync_gradients(model, False)  # no all-reduce across replicas: each rank compares its own gradients
        with autocast:
            loss = model(x, y, loss_reduction="sum") * (sign * loss_scale)
        loss.backward()
        return sign * loss.detach().float(), torch.stack([
            rows_held(p.grad)[0].float().norm() if p.grad is not None else torch.zeros((), device=x.device)
            for p in raw_model.parameters()])

    compiled_loss, compiled_norm = one_pass(1)
    try:
        with torch.compiler.set_stance("force_eager"):
            eager_loss, difference = one_pass(-1)
    except torch.OutOfMemoryError:  # uncompiled takes more activation memory: then the check is skipped
        return None
    finally:
        raw_model.zero_grad(set_to_none=True)
    # per parameter, relative to its own gradient, with a floor of 1% of the largest for tiny ones
    errors = difference / (compiled_norm + 1e-2 * compiled_norm.max()).clamp(min=1e-30)
    loss_error = (compiled_loss - eager_loss).abs() / eager_loss.abs().clamp(min=1e-30)
    summary = torch.cat([loss_error[None], errors]).nan_to_num(nan=float("inf"))
    if dist.is_initialized():  # every rank decides from the same numbers: the largest error anywhere
        dist.all_reduce(summary, op=dist.ReduceOp.MAX)
    worst = int(summary[1:].argmax())
    if summary[0] > rtol:
        return (f"{disagree}the loss of one micro-batch is {compiled_loss.item():.6g} compiled, "
                f"{eager_loss.item():.6g} uncompiled")
    if summary[1 + worst] > rtol:
        name = [name for name, _ in raw_model.named_parameters()][worst]
        return (f"{disagree}the gradient of {name} has norm {compiled_norm[worst].item():.4g} compiled, and is "
                f"{difference[worst].item():.4g} away from the uncompiled one")
    return None
