"""
Muon: MomentUm Orthogonalized by Newton-Schulz, for the hidden weight matrices of a transformer.

Each step takes SGD momentum (Nesterov) of the gradient and replaces it by the nearest
semi-orthogonal matrix, U V^T of its SVD U S V^T, approximated by a few Newton-Schulz
iterations in bf16. Every direction of the update then moves at the same rate, however
unevenly the raw gradient is spread over them.

Sources: Keller Jordan, "Muon: An optimizer for hidden layers in neural networks" (2024 blog
post, and the modded-nanogpt repository), for the method and the quintic coefficients;
Jingyuan Liu et al., "Muon is Scalable for LLM Training" (Moonshot AI, 2025), for decoupled
weight decay and the update scale below.

Update scale: 0.2 * sqrt(max(rows, cols)). An orthogonalized update has RMS 1/sqrt(max(rows, cols)),
so this makes its RMS 0.2, about AdamW's, for every shape: one learning rate fits all matrices,
and AdamW's learning rate and weight decay are a good starting point for Muon's.

Distributed (ZeRO-1 style): gradients arrive already averaged across ranks (DDP). Matrices are
grouped by shape and each rank owns a slice of every group: it alone keeps their momentum and
orthogonalizes them, as one batched matmul; an all-gather gives every rank all the updates,
which every rank applies to its replica of the weights. The momentum memory, the momentum
arithmetic and the Newton-Schulz work per GPU all fall with the number of GPUs. state_dict()
gathers the whole momentum, so checkpoints do not depend on the world size. One process issues
no collectives.
"""
import torch
import torch.distributed as dist

# quintic iteration X <- a X + b (X X^T) X + c (X X^T)^2 X; these coefficients push every singular
# value in (0, 1] towards 1 quickly, ending in roughly [0.7, 1.2] rather than exactly at 1
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G, steps=5, dtype=torch.bfloat16):
    """Approximately orthogonalize the last two dims of G (a matrix or a batch of same-shape matrices)."""
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype)
    transposed = X.size(-2) > X.size(-1)
    if transposed:  # iterate on the wide orientation: X X^T is then the smaller Gram matrix
        X = X.mT
    # Frobenius norm >= spectral norm, so this puts every singular value in [0, 1]
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    batched = X.dim() == 3
    X = X if batched else X.unsqueeze(0)
    for _ in range(steps):
        # baddbmm folds the scalar multiples and the sum into the matmul: 3 kernels per iteration, not 8
        A = torch.bmm(X, X.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    X = X if batched else X.squeeze(0)
    return X.mT if transposed else X


# torch >= 2.13 renames all_gather_into_tensor to all_gather_single
all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def update_scale(shape):
    return 0.2 * max(shape[-2], shape[-1]) ** 0.5


def world():
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share(count, rank, world_size):
    """A rank's share of a group of count matrices: the padded slice size (the same on every rank,
    as all-gather wants) and its own [first, last)."""
    per_rank = -(-count // world_size)
    return per_rank, min(rank * per_rank, count), min((rank + 1) * per_rank, count)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters. lr and weight_decay mean what they mean for AdamW (see update_scale).
    Like torch's fused AdamW, it skips the whole step (momentum and weights) when the attribute
    found_inf is set to a device scalar that is nonzero, so a bad step is skipped without a host sync.
    With several ranks each keeps the momentum of its share only; state_dict() gathers it (a
    collective: every rank calls it) and load_state_dict() keeps each rank's share."""

    def __init__(self, params, lr=6e-4, weight_decay=0.0, momentum=0.95, nesterov=True, ns_steps=5):
        params = list(params)
        if any(p.dim() != 2 for p in params):
            raise ValueError("Muon takes 2-D parameters only; give the others to AdamW")
        # one group per shape, in a fixed order, so every rank agrees on who orthogonalizes what
        shapes = sorted({tuple(p.shape) for p in params})
        groups = [{"params": [p for p in params if tuple(p.shape) == shape]} for shape in shapes]
        super().__init__(groups, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_steps=ns_steps))

    @torch.no_grad()
    def step(self):
        rank, world_size = world()
        found_inf = getattr(self, "found_inf", None)
        keep = None if found_inf is None else found_inf == 0  # a device bool: apply this step or skip it
        for group in self.param_groups:
            params = group["params"]
            if all(p.grad is None for p in params):
                continue
            if any(p.grad is None for p in params):
                raise ValueError(f"Muon: some {tuple(params[0].shape)} matrices have no gradient; "
                                 f"leave parameters that do not train out of the optimizer")
            lr, momentum, shape = group["lr"], group["momentum"], params[0].shape
            per_rank, first, last = share(len(params), rank, world_size)
            mine = params[first:last]  # the momentum and Newton-Schulz of these are this rank's work
            for p in mine:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            buffers = [self.state[p]["momentum_buffer"] for p in mine]
            grads = [p.grad for p in mine]
            stacked = torch.empty((per_rank, *shape), device=params[0].device, dtype=torch.bfloat16)
            stacked[len(mine):].zero_()
            if mine:
                if keep is not None:
                    # a skipped step lerps the momentum towards itself, so it stays exactly as it was
                    # (where, not a multiply by 0: NaN * 0 is NaN); the gradients are spent anyway
                    for g, b in zip(grads, buffers):
                        torch.where(keep, g, b, out=g)
                # foreach: one multi-tensor kernel per op for the whole share instead of one per matrix
                torch._foreach_lerp_(buffers, grads, 1 - momentum)
                updates = torch._foreach_lerp(grads, buffers, momentum) if group["nesterov"] else buffers
                torch._foreach_copy_(list(stacked[:len(mine)].unbind(0)), updates)
            orthogonal = newton_schulz(stacked, group["ns_steps"])
            if world_size > 1:
                gathered = torch.empty((world_size * per_rank, *shape), device=orthogonal.device, dtype=orthogonal.dtype)
                all_gather(gathered, orthogonal.contiguous())
                orthogonal = gathered
            # every rank applies every update (the weights are replicated), scaled and zeroed when
            # skipped once for the whole group, in bf16
            scale = -lr * update_scale(shape)
            orthogonal = orthogonal * (scale if keep is None else keep * scale)
            if group["weight_decay"]:  # decoupled, AdamW's
                decay = 1 - lr * group["weight_decay"]
                torch._foreach_mul_(params, decay if keep is None else torch.where(keep, decay, 1.0))
            torch._foreach_add_(params, list(orthogonal[:len(params)].unbind(0)))

    def state_dict(self):
        """The whole state, as one process would hold it: with several ranks, the momentum shares are
        all-gathered (a collective), one group at a time, and rank 0 keeps them in CPU memory."""
        state = super().state_dict()
        rank, world_size = world()
        if world_size == 1:
            return state
        index = 0
        for group in self.param_groups:
            params = group["params"]
            per_rank, first, last = share(len(params), rank, world_size)
            mine = torch.zeros((per_rank, *params[0].shape), device=params[0].device, dtype=params[0].dtype)
            for j, p in enumerate(params[first:last]):
                if "momentum_buffer" in self.state[p]:
                    mine[j] = self.state[p]["momentum_buffer"]
            gathered = torch.empty((world_size * per_rank, *mine.shape[1:]), device=mine.device, dtype=mine.dtype)
            all_gather(gathered, mine)
            if rank == 0:
                gathered = gathered.cpu()
            for i in range(len(params)):
                state["state"][index + i] = {"momentum_buffer": gathered[i].clone() if rank == 0 else gathered[i]}
            index += len(params)
        return state

    def load_state_dict(self, state_dict):
        """Loads a whole state (from any world size) and keeps this rank's share of the momentum."""
        super().load_state_dict(state_dict)
        rank, world_size = world()
        for group in self.param_groups:
            _, first, last = share(len(group["params"]), rank, world_size)
            for p in group["params"][:first] + group["params"][last:]:
                self.state.pop(p, None)
