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

Distributed, with DDP (ZeRO-1 style): gradients arrive averaged across ranks. Matrices are grouped
by shape and each rank owns a slice of every group: it alone keeps their momentum and
orthogonalizes them, as one batched matmul; an all-gather gives every rank all the updates, which
every rank applies to its replica of the weights.
With FSDP2: each rank holds a shard (rows) of every matrix and of its gradient. It keeps the momentum
of its rows, computes their update, and sends them to the owner of each matrix; the owner
orthogonalizes the whole matrices it owns and sends each rank back its rows of the result: one
gather and one scatter of the hidden matrices (all_to_all) per step, not an all-gather of every
gradient to every rank.
Either way the momentum memory, the momentum arithmetic and the Newton-Schulz work per GPU fall with
the number of GPUs. The checkpoint holds the whole momentum: each rank writes the rows it keeps
(state_rows says which) and reads them back (load_state_rows). One process issues no collectives.
"""
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from data import ceil_div

# quintic iteration X <- a X + b (X X^T) X + c (X X^T)^2 X; these coefficients push every singular
# value in (0, 1] towards 1 quickly, ending in roughly [0.7, 1.2] rather than exactly at 1
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# bf16: fast on tensor cores and precise enough for an update direction. But Newton-Schulz amplifies
# the last bits of ill-conditioned momenta, so runs that sum gradients in another order (another world
# size or mode) drift apart at this precision; tests that compare such runs set float32 here.
NS_DTYPE = torch.bfloat16
# NorMuon's decay rate for each neuron's mean square update (Li et al. 2025, arXiv:2510.05491; nanochat's)
NEURON_NORM_BETA = 0.95


# Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv:2505.16932; the coefficients as nanochat uses
# them): a different quintic for each iteration, chosen to bring every singular value close to 1 in 5
ORTHOGONALIZERS = {
    "newton_schulz": [NS_COEFFICIENTS] * 5,
    "polar_express": [(8.156554524902461, -22.48329292557795, 15.878769915207462),
                      (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                      (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                      (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                      (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)],
}


def newton_schulz(G, steps=5, method="newton_schulz"):
    """Approximately orthogonalize the last two dims of G (a matrix or a batch of same-shape matrices), in
    NS_DTYPE, with steps iterations of method's quintics (ORTHOGONALIZERS)."""
    coefficients = ORTHOGONALIZERS[method][:steps]
    X = G.to(NS_DTYPE)
    transposed = X.size(-2) > X.size(-1)
    if transposed:  # iterate on the wide orientation: X X^T is then the smaller Gram matrix
        X = X.mT
    # Frobenius norm >= spectral norm, so this puts every singular value in [0, 1]; Polar Express's
    # first steps are tuned for a spectral norm a little below 1, hence its 1% margin
    margin = 1.01 if method == "polar_express" else 1.0
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * margin + 1e-7)
    batched = X.dim() == 3
    X = X if batched else X.unsqueeze(0)
    for a, b, c in coefficients:
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


def world(group=None):
    """(rank, world size) in group (None: the default group); (0, 1) without one."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def row_range(rows, rank, world_size):
    """The rows [first, last) of a matrix that FSDP2 gives a rank (it splits rows as torch.chunk does)."""
    chunk = ceil_div(rows, world_size)
    return min(rank * chunk, rows), min((rank + 1) * chunk, rows)


def share(count, rank, world_size):
    """A rank's share of a group of count matrices: the padded slice size (the same on every rank,
    as all-gather wants) and its own [first, last)."""
    per_rank = ceil_div(count, world_size)
    return per_rank, min(rank * per_rank, count), min((rank + 1) * per_rank, count)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters. lr and weight_decay mean what they mean for AdamW (see update_scale).
    Like torch's fused AdamW, it skips the whole step (momentum and weights) when the attribute
    found_inf is set to a device scalar that is nonzero, so a bad step is skipped without a host sync.
    group: the process group that replicates (DDP) or shards (FSDP2: its shard group) the matrices;
    None for the default group."""

    def __init__(self, params, lr=6e-4, weight_decay=0.0, momentum=0.95, nesterov=True, ns_steps=5,
                 orthogonalize="newton_schulz", cautious_decay=False, neuron_norm=False, group=None):
        if orthogonalize not in ORTHOGONALIZERS:
            raise ValueError(f"orthogonalize must be one of {sorted(ORTHOGONALIZERS)}, got {orthogonalize!r}")
        params = list(params)
        if any(p.dim() != 2 for p in params):
            raise ValueError("Muon takes 2-D parameters only; give the others to AdamW")
        # one group per shape, in a fixed order, so every rank agrees on who orthogonalizes what
        shapes = sorted({tuple(p.shape) for p in params})
        groups = [{"params": [p for p in params if tuple(p.shape) == shape]} for shape in shapes]
        super().__init__(groups, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_steps=ns_steps, orthogonalize=orthogonalize, cautious_decay=cautious_decay,
                                      neuron_norm=neuron_norm))
        self.group = group

    def momentum_rows(self, p):
        """The rows [first, last) of p whose momentum this rank keeps, or None."""
        rank, world_size = world(self.group)
        if isinstance(p, DTensor):
            return row_range(p.shape[0], rank, world_size)
        return (0, p.shape[0]) if self.owns(p) else None

    def state_rows(self, p):
        """{key: (tensor, first row, whole shape)}: p's state that this rank keeps, placed in the whole
        tensor a checkpoint holds: the momentum's rows of p (momentum_rows), NorMuon's second moment
        whole (only p's owner keeps it)."""
        if not self.state.get(p):  # not Muon's, or a matrix whose momentum another rank keeps
            return {}
        first = self.momentum_rows(p)[0]
        return {key: (value, 0, tuple(value.shape)) if key == "second_moment" else (value, first, tuple(p.shape))
                for key, value in self.state[p].items()}

    def load_state_rows(self, p, read, keys):
        """p's state from a checkpoint that holds the keys of it, the counterpart of state_rows:
        read(key, first, last) reads rows [first, last) of the whole tensor (None, None: all of it)."""
        kept = self.momentum_rows(p)
        if kept is not None:
            self.state[p] = {"momentum_buffer": read("momentum_buffer", *kept)}
            if "second_moment" in keys and self.owns(p):
                self.state[p]["second_moment"] = read("second_moment", None, None)

    def owns(self, p):
        """Whether this rank orthogonalizes p (and keeps its neuron_norm state): a share of each shape group."""
        rank, world_size = world(self.group)
        params = next(g["params"] for g in self.param_groups if any(q is p for q in g["params"]))
        _, first, last = share(len(params), rank, world_size)
        return any(q is p for q in params[first:last])

    def _normalize_neurons(self, group, owned, orthogonal, keep):
        """NorMuon: each neuron's row of the update (a column's, for a wide matrix) divided by the root of
        its running mean square, then the whole update scaled back to its norm, so no neuron's weights
        move much faster than the others'. orthogonal's first len(owned) matrices are owned's; in place."""
        if not (group["neuron_norm"] and owned):
            return
        updates = orthogonal[:len(owned)].float()
        mean_square = updates.square().mean(dim=-1 if updates.size(-2) >= updates.size(-1) else -2, keepdim=True)
        for p, m in zip(owned, mean_square):
            if "second_moment" not in self.state[p]:
                self.state[p]["second_moment"] = torch.zeros_like(m)
        moments = [self.state[p]["second_moment"] for p in owned]
        old = torch.stack(moments)
        new = old.lerp(mean_square, 1 - NEURON_NORM_BETA)
        if keep is not None:  # a skipped step leaves the state as it was
            new = torch.where(keep, new, old)
        torch._foreach_copy_(moments, list(new.unbind(0)))
        scaled = updates * new.clamp_min(1e-10).rsqrt()
        norms = updates.norm(dim=(-2, -1), keepdim=True) / scaled.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10)
        orthogonal[:len(owned)] = (scaled * norms).to(orthogonal.dtype)

    def _momentum(self, group, params, grads, keep):
        """Each param's update from its (Nesterov) momentum, which it keeps in fp32, for these rows."""
        for p, g in zip(params, grads):
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(g)
        buffers = [self.state[p]["momentum_buffer"] for p in params]
        if keep is not None:
            # a skipped step lerps the momentum towards itself, so it stays exactly as it was
            # (where, not a multiply by 0: NaN * 0 is NaN); the gradients are spent anyway
            for g, b in zip(grads, buffers):
                torch.where(keep, g, b, out=g)
        # foreach: one multi-tensor kernel per op for the whole list instead of one per matrix
        torch._foreach_lerp_(buffers, grads, 1 - group["momentum"])
        return torch._foreach_lerp(grads, buffers, group["momentum"]) if group["nesterov"] else buffers

    def _apply(self, group, weights, updates, keep):
        """weights (whole or this rank's rows) += the scaled orthogonalized updates, after decoupled weight
        decay; scaled by zero when skipped, once for the whole group, in bf16, then cast once to the
        weights' dtype: a foreach add over mixed dtypes leaves CUDA's multi-tensor kernel for one per matrix."""
        lr = group["lr"]
        scale = -lr * update_scale(group["params"][0].shape)
        updates = (updates * (scale if keep is None else keep * scale)).to(weights[0].dtype)
        if group["weight_decay"] and group["cautious_decay"]:
            # cautious: decay only the entries the update also moves towards zero (Chen et al. 2025)
            decay = torch.where(updates * torch.stack(weights) < 0, lr * group["weight_decay"], 0.0)
            if keep is not None:
                decay = decay * keep
            torch._foreach_mul_(weights, list((1 - decay).unbind(0)))
        elif group["weight_decay"]:  # decoupled, AdamW's
            decay = 1 - lr * group["weight_decay"]
            torch._foreach_mul_(weights, decay if keep is None else torch.where(keep, decay, 1.0))
        torch._foreach_add_(weights, list(updates.unbind(0)))

    @torch.no_grad()
    def step(self):
        rank, world_size = world(self.group)
        found_inf = getattr(self, "found_inf", None)
        keep = None if found_inf is None else found_inf == 0  # a device bool: apply this step or skip it
        for group in self.param_groups:
            params = group["params"]
            if all(p.grad is None for p in params):
                continue
            if any(p.grad is None for p in params):
                raise ValueError(f"Muon: some {tuple(params[0].shape)} matrices have no gradient; "
                                 f"leave parameters that do not train out of the optimizer")
            if isinstance(params[0], DTensor):
                self._step_sharded(group, rank, world_size, keep)
            else:
                self._step_replicated(group, rank, world_size, keep)

    def _step_replicated(self, group, rank, world_size, keep):
        """DDP (or one process): this rank's share of whole matrices, then an all-gather of the updates."""
        params, shape = group["params"], group["params"][0].shape
        per_rank, first, last = share(len(params), rank, world_size)
        mine = params[first:last]  # the momentum and Newton-Schulz of these are this rank's work
        stacked = torch.empty((per_rank, *shape), device=params[0].device, dtype=NS_DTYPE)
        stacked[len(mine):].zero_()
        if mine:
            torch._foreach_copy_(
                list(stacked[: len(mine)].unbind(0)), self._momentum(group, mine, [p.grad for p in mine], keep)
            )
        orthogonal = newton_schulz(stacked, group["ns_steps"], group["orthogonalize"])
        self._normalize_neurons(group, mine, orthogonal, keep)
        if world_size > 1:
            gathered = torch.empty((world_size * per_rank, *shape), device=orthogonal.device, dtype=orthogonal.dtype)
            all_gather(gathered, orthogonal.contiguous(), group=self.group)
            orthogonal = gathered
        self._apply(group, params, orthogonal[:len(params)], keep)  # every rank updates its whole replica

    def _step_sharded(self, group, rank, world_size, keep):
        """FSDP2: the momentum of this rank's rows; the rows to each matrix's owner, who orthogonalizes
        the whole matrix; each rank's rows of the result back."""
        params = group["params"]
        rows, cols = params[0].shape
        bounds = [row_range(rows, r, world_size) for r in range(world_size)]
        sizes = [(last - first) * cols for first, last in bounds]  # elements of one matrix's rows, per rank
        per_rank = share(len(params), 0, world_size)[0]
        owned = [last - first for _, first, last in (share(len(params), r, world_size) for r in range(world_size))]
        weights = [p.to_local() for p in params]
        updates = self._momentum(group, params, [p.grad.to_local() for p in params], keep)
        # 1. to the owners: matrix i is owned by rank i // per_rank, so the matrices go in order, owner by owner
        send = torch.cat([u.reshape(-1) for u in updates]).to(NS_DTYPE)
        received = torch.empty(owned[rank] * sum(sizes), device=send.device, dtype=NS_DTYPE)
        dist.all_to_all_single(
            received, send, [owned[rank] * s for s in sizes], [n * sizes[rank] for n in owned], group=self.group
        )
        whole = torch.zeros((per_rank, rows, cols), device=send.device, dtype=NS_DTYPE)
        offset = 0
        for (first, last), size in zip(bounds, sizes):  # from each rank: its rows of every matrix this rank owns
            for j in range(owned[rank]):
                whole[j, first:last] = received[offset:offset + size].view(last - first, cols)
                offset += size
        # 2. orthogonalize the matrices this rank owns
        orthogonal = newton_schulz(whole, group["ns_steps"], group["orthogonalize"])
        first_owned = share(len(params), rank, world_size)[1]
        self._normalize_neurons(group, params[first_owned:first_owned + owned[rank]], orthogonal, keep)
        # 3. back: to each rank, its rows of every matrix owned here
        send = torch.cat([orthogonal[j, first:last].reshape(-1) for first, last in bounds for j in range(owned[rank])])
        received = torch.empty(len(params) * sizes[rank], device=send.device, dtype=NS_DTYPE)
        dist.all_to_all_single(
            received, send, [n * sizes[rank] for n in owned], [owned[rank] * s for s in sizes], group=self.group
        )
        self._apply(group, weights, received.view(len(params), *weights[0].shape), keep)
