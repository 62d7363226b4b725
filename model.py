"""
The transformer: a decoder-only GPT laid out exactly like Hugging Face's Llama
(Qwen3 when qk_norm is on), so export is a renaming of keys, not a conversion.

    embed_tokens -> n_layer x [RMSNorm -> attention(RoPE, GQA) -> +residual,
                               RMSNorm -> SwiGLU MLP -> +residual] -> RMSNorm -> lm_head

No biases anywhere. Attention goes through F.scaled_dot_product_attention so CUDA
picks the flash kernel (with document masking, a kernel that takes a mask). Also here: the
initialisation's scales, the optimizers' parameter groups, FLOPs per token (for MFU) and
generation with a KV cache.
"""
from dataclasses import asdict, dataclass, fields
import math
import re
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from data import NOT_LEARNED

MAX_VOCAB_SIZE = 2**24  # token ids are stored as uint32; no real vocabulary comes near this


@dataclass
class ModelArgs:
    vocab_size: int = 50304     # the tokenizer's vocabulary; embeddings are padded to a multiple of 128
    block_size: int = 1024      # longest sequence the model is trained on
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 12         # < n_head gives grouped-query attention; must divide n_head
    n_embd: int = 768
    mlp_ratio: float = 8 / 3    # SwiGLU hidden = mlp_ratio * n_embd, rounded up to a multiple of 128
    rope_base: float = 10000.0
    qk_norm: bool = False       # RMSNorm on each head's q and k before RoPE (Qwen3)
    tie_embeddings: bool = False
    norm_eps: float = 1e-5

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self):
        # tensor-core matmuls want dimensions that are multiples of 64/128; the padded rows are never sampled
        return math.ceil(self.vocab_size / 128) * 128

    @property
    def mlp_hidden_dim(self):
        return math.ceil(self.mlp_ratio * self.n_embd / 128) * 128


def check_model_args(values, where="model config"):
    """ModelArgs from a dict (train.py's config, a checkpoint's meta.json, a Hugging Face config), or
    a ModelArgs, checked whole: keys, types and every setting that cannot build a model. ValueError
    naming where and every problem otherwise (before any model is built)."""
    if isinstance(values, ModelArgs):
        values = asdict(values)
    if not isinstance(values, dict):
        raise ValueError(f"{where}: model_args must be a dict, got {type(values).__name__}")
    unknown = set(values) - {f.name for f in fields(ModelArgs)}
    problems = [f"model_args has unknown keys {sorted(unknown)}"] if unknown else []
    for field in fields(ModelArgs):
        if field.name not in values:
            if field.name != "norm_eps":  # older checkpoints have the default
                problems.append(f"model_args lacks {field.name!r}")
            continue
        value, kind = values[field.name], type(field.default)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (isinstance(value, bool) if kind is bool else number and (kind is float or isinstance(value, int))):
            problems.append(f"model_args.{field.name} must be a {kind.__name__}, got {value!r}")
    if problems:
        raise ValueError(f"{where}: {'; '.join(problems)}")
    a = ModelArgs(**values)
    problems = [f"{name} must be at least 1, got {value}" for name, value in [
        ("n_layer", a.n_layer), ("n_head", a.n_head), ("n_kv_head", a.n_kv_head), ("n_embd", a.n_embd),
        ("block_size", a.block_size), ("vocab_size", a.vocab_size)] if not value >= 1]
    problems += [f"{name} must be a finite number > 0, got {value}" for name, value in [
        ("mlp_ratio", a.mlp_ratio), ("rope_base", a.rope_base), ("norm_eps", a.norm_eps)] if not 0 < value < math.inf]
    if a.vocab_size > MAX_VOCAB_SIZE:
        problems.append(f"vocab_size={a.vocab_size} is larger than {MAX_VOCAB_SIZE:,}")
    if not problems and a.n_embd % a.n_head:
        problems.append(f"n_embd={a.n_embd} is not divisible by n_head={a.n_head}")
    elif not problems and a.head_dim % 2:
        problems.append(f"head_dim={a.head_dim} (n_embd/n_head) must be even for RoPE")
    if not problems and a.n_head % a.n_kv_head:
        problems.append(f"n_head={a.n_head} is not divisible by n_kv_head={a.n_kv_head}")
    if problems:
        raise ValueError(f"{where}: {'; '.join(problems)}")
    return a


@dataclass
class Init:
    """The standard deviations the weights start from (GPT.init_weights): not part of the model's
    shape, so checkpoints and exports do not record them."""
    std: float = 0.02
    embed_std: float = 0.02     # embed_tokens (the head too when tied)
    head_std: float = 0.02      # lm_head
    zero_projections: bool = False  # o_proj and down_proj start at zero

    def std_of(self, name, n_layer):
        if name == "embed_tokens.weight":
            return self.embed_std
        if name == "lm_head.weight":
            return self.head_std
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            return 0.0 if self.zero_projections else self.std / math.sqrt(2 * n_layer)
        return self.std


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def rope_cos_sin(head_dim, length, base, device=None):
    """cos/sin tables in Llama's rotate-half layout: frequencies repeated twice, shape (length, head_dim)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    # x: (B, heads, T, head_dim); cos/sin: (T, head_dim)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).type_as(x)


def chunked_cross_entropy(x, weight, targets, *, chunk_tokens):
    """The summed cross-entropy of the logits x @ weight.T (x: (N, C) hidden states, weight: the head's
    (V, C), targets: (N,), NOT_LEARNED ignored), equal to GPT.loss's reference path in value and gradient,
    computed chunk_tokens rows at a time: no (N, V) tensor outlives its chunk. Under autocast the
    matmuls run in its dtype and the softmax in fp32, as in the reference."""
    compute_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    with torch.autocast(x.device.type, enabled=False):
        return _ChunkedCrossEntropy.apply(x, weight, targets, chunk_tokens, compute_dtype)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and both gradients chunk by chunk, since the gradient of the summed
    cross-entropy with respect to a row's logits is softmax(logits) - one_hot(target); backward only
    scales them. The same matmuls as the reference (one forward, two backward). In flight: one fp32
    (chunk, V) tensor, which each stage below rewrites in place (logits, then exp, then the gradient),
    and its compute_dtype copy."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_tokens, compute_dtype):
        w = weight.to(compute_dtype)
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, x.size(0), chunk_tokens):
            xs, ts = x[start:start + chunk_tokens].to(compute_dtype), targets[start:start + chunk_tokens]
            learned, target = ts != NOT_LEARNED, ts.clamp(min=0)[:, None]
            # 1) the logits, and what the loss needs of them: cross-entropy = logsumexp - the target's logit
            logits = (xs @ w.t()).float()
            target_logit, top = logits.gather(1, target), logits.amax(dim=-1, keepdim=True)
            exp = logits.sub_(top).exp_()  # in place: the logits are not needed again
            total = exp.sum(dim=-1, keepdim=True)
            # out of place: torch 2.11's compiler zeroes the gradient of an autograd.Function's output updated in place
            loss = loss + torch.where(learned[:, None], top + total.log() - target_logit, 0.0).sum()
            # 2) the logits' gradient, softmax - one_hot, zero where nothing is learned (in place again)
            grad_logits = exp.div_(total).scatter_add_(1, target, -learned[:, None].float()).mul_(learned[:, None])
            grad_logits = grad_logits.to(compute_dtype)
            del logits, exp
            # 3) through the head's matmul: the gradients of the hidden states and of the weight
            grad_x[start:start + chunk_tokens] = grad_logits @ w
            grad_w += (grad_logits.t() @ xs).float()
        ctx.save_for_backward(grad_x, grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss.to(grad_x.dtype), grad_w * grad_loss.to(grad_w.dtype), None, None, None


class KVCache:
    """Preallocated keys/values for every layer: (B, n_kv_head, max_len, head_dim)."""

    def __init__(self, args, batch_size, max_len, device, dtype):
        shape = (batch_size, args.n_kv_head, max_len, args.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layer)]
        self.length = 0  # positions filled so far


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = args.n_head, args.n_kv_head, args.head_dim
        self.q_proj = nn.Linear(args.n_embd, args.n_head * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.n_embd, args.n_kv_head * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.n_embd, args.n_kv_head * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_head * args.head_dim, args.n_embd, bias=False)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps)
        self.qk_norm = args.qk_norm

    def forward(self, x, cos, sin, cache=None, layer=0, mask=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        is_causal = True
        if cache is not None:
            start = cache.length
            cache.keys[layer][:, :, start:start + T] = k
            cache.values[layer][:, :, start:start + T] = v
            k, v = cache.keys[layer][:, :, :start + T], cache.values[layer][:, :, :start + T]
            # a prefill from position 0 is an ordinary causal pass; one new token attends to everything cached
            assert start == 0 or T == 1, "the KV cache takes a prefill at position 0, then one token at a time"
            is_causal = start == 0
        gqa = {"enable_gqa": True} if self.n_kv_head != self.n_head else {}
        if mask is not None:  # causal within each document (GPT.document_token)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, **gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.gate_proj = nn.Linear(args.n_embd, args.mlp_hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.n_embd, args.mlp_hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.mlp_hidden_dim, args.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.input_layernorm = RMSNorm(args.n_embd, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.n_embd, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, cache=None, layer=0, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class GPT(nn.Module):
    def __init__(self, args: ModelArgs, *, init=None, checkpoint_blocks=False, loss_chunk_tokens=0,
                 document_token=None):
        """args: the model's shape (what checkpoints and exports record). The training options, which
        are not part of it:
        init               the initialisation's scales (Init; the default: GPT-2's)
        checkpoint_blocks  activation checkpointing: keep only each block's input for the backward pass
                           and recompute the rest, about a third more compute for a fraction of the
                           activation memory (models whose micro-batch would not fit otherwise)
        loss_chunk_tokens  the head and the loss this many tokens at a time (chunked_cross_entropy): the
                           (tokens, vocabulary) logits, and their gradient, exist one chunk at a time; 0: at once
        document_token     with a token id, attention does not cross the documents that token starts (SDPA
                           with a mask: not the flash kernel on CUDA)"""
        super().__init__()
        self.args = check_model_args(args)
        self.init = init or Init()
        self.checkpoint_blocks, self.loss_chunk_tokens, self.document_token = (checkpoint_blocks, loss_chunk_tokens,
                                                                               document_token)
        self.embed_tokens = nn.Embedding(args.padded_vocab_size, args.n_embd)
        self.layers = nn.ModuleList([Block(args) for _ in range(args.n_layer)])
        self.norm = RMSNorm(args.n_embd, args.norm_eps)
        self.lm_head = nn.Linear(args.n_embd, args.padded_vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # non-persistent: recomputed from the args, so checkpoints and exports hold weights only
        cos, sin = rope_cos_sin(args.head_dim, args.block_size, args.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed=None):
        """GPT-2's scheme by default: every matrix N(0, 0.02), and the two projections that write into
        the residual stream (o_proj, down_proj) scaled by 1/sqrt(2 * n_layer): each block adds two such
        terms, so the residual's variance stays O(1) however deep the model is. self.init changes the
        embedding's and the head's scales, or zeroes the two projections (each block then starts as
        the identity). Each parameter is drawn from a generator of its own, seeded by (seed, its name),
        so its values do not depend on the device, the order, or the sharding that holds it: a sharded
        parameter (FSDP2's DTensor) is drawn whole and keeps its rows. seed None: torch's initial seed."""
        from torch.distributed.tensor import DTensor, distribute_tensor
        seed = torch.initial_seed() if seed is None else seed
        for name, p in self.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            if local.is_meta:  # built on the meta device: materialize() draws the values
                continue
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                local.fill_(1.0)
                continue
            scale = self.init.std_of(name, self.args.n_layer)
            generator = torch.Generator(device=local.device).manual_seed(zlib.crc32(f"{seed}/{name}".encode()))
            full = torch.empty(p.shape, device=local.device).normal_(0.0, scale, generator=generator)
            if isinstance(p, DTensor):  # this rank's rows of the whole, no communication
                full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
            local.copy_(full)
        cos, sin = rope_cos_sin(self.args.head_dim, self.args.block_size, self.args.rope_base, self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def materialize(self, device, seed):
        """A model built on the meta device (no memory), given memory on device and initialised from
        seed; under FSDP2, after sharding: each rank then allocates and draws only the rows it holds."""
        self.to_empty(device=device)
        self.init_weights(seed)
        return self

    def forward(self, idx, targets=None, loss_reduction="mean", cache=None):
        """idx (B, T) token ids -> logits (B, T, padded_vocab), or with targets the loss (self.loss)."""
        x = self.trunk(idx, cache)
        return self.lm_head(x) if targets is None else self.loss(x, targets, reduction=loss_reduction)

    def trunk(self, idx, cache=None):
        """idx (B, T) -> the final hidden states (B, T, n_embd): the embedding, the blocks, the last norm."""
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        assert start + T <= self.args.block_size, f"sequence of {start + T} exceeds block_size={self.args.block_size}"
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        mask = None
        if self.document_token is not None and cache is None:
            document = (idx == self.document_token).cumsum(dim=1)
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
            mask = (document[:, None, :, None] == document[:, None, None, :]) & causal
        x = self.embed_tokens(idx)
        for i, layer in enumerate(self.layers):
            if self.checkpoint_blocks and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, None, i, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache, i, mask)
        if cache is not None:
            cache.length += T
        return self.norm(x)

    def loss(self, x, targets, reduction="mean"):
        """The cross-entropy of the head's logits on hidden states x (B, T, C) against targets (B, T); a
        target NOT_LEARNED (-1) counts for nothing. reduction: 'none' (B, T) per token, 'sum' (what
        training uses: train.py scales it by 1 / the learned targets of the whole step), 'mean'.
        The reference is the plain F.cross_entropy below. With loss_chunk_tokens, training takes
        chunked_cross_entropy instead: the same values and gradients (test_model.py keeps them equal)
        without the (B*T, V) logits ever in memory.
        Adding a term: one on the logits (a z-loss, label smoothing) goes in the reference path, and
        needs loss_chunk_tokens=0 (the chunked path derives its gradient by hand: softmax - one-hot);
        one on the hidden states or the weights adds to the result in either path. Training sums over
        tokens (reduction='sum'), so a term is added as a sum over the learned tokens too."""
        B, T, C = x.shape
        x, targets = x.view(B * T, C), targets.reshape(B * T)
        if self.loss_chunk_tokens and reduction != "none" and torch.is_grad_enabled():
            total = chunked_cross_entropy(x, self.lm_head.weight, targets, chunk_tokens=self.loss_chunk_tokens)
        else:
            # the reference. Without gradients (evaluation), chunked too: the logits never all at once
            rows = self.loss_chunk_tokens if self.loss_chunk_tokens and not torch.is_grad_enabled() else B * T
            per_token = torch.cat([
                F.cross_entropy(self.lm_head(xs).float(), ts, ignore_index=NOT_LEARNED, reduction="none")
                for xs, ts in zip(x.split(rows), targets.split(rows))
            ]).view(B, T)
            if reduction == "none":
                return per_token
            total = per_token.sum()
        return total if reduction == "sum" else total / (targets != NOT_LEARNED).sum()

    def param_groups(self, *, learning_rate, weight_decay, embed_lr=None, head_lr=None, norm_lr=None,
                     decay_embed_head=True, use_muon=False):
        """The parameters by optimizer, for train.py to build them: ({"adamw": AdamW's groups, "muon": the
        matrices inside the blocks, only with use_muon}, a line per group saying which parameters went
        where). AdamW's groups: the embedding, the head, the matrices (unless Muon takes them) and the
        1-D norm gains, each with its "name", peak "lr" (embed_lr, head_lr, norm_lr; None: learning_rate),
        "weight_decay" (matrices only; the embedding and the head too with decay_embed_head) and
        "lr_scale", its peak over learning_rate, which train.py's schedule multiplies."""
        named = dict(self.named_parameters())  # a tied head appears once, as the embedding
        embed = [named["embed_tokens.weight"]]
        head = [named["lm_head.weight"]] if "lm_head.weight" in named else []
        hidden = [p for name, p in named.items() if name.startswith("layers.") and p.dim() == 2]
        vectors = [p for p in named.values() if p.dim() < 2]
        embed_head_decay = weight_decay if decay_embed_head else 0.0
        adamw = [{"params": ps, "name": name, "lr": learning_rate if lr is None else lr, "weight_decay": wd}
                 for name, ps, lr, wd in [("embedding", embed, embed_lr, embed_head_decay),
                                          ("head", head, head_lr, embed_head_decay),
                                          ("matrices", [] if use_muon else hidden, None, weight_decay),
                                          ("norms", vectors, norm_lr, 0.0)] if ps]
        for group in adamw:
            group["lr_scale"] = group["lr"] / learning_rate
        groups = {"adamw": adamw, **({"muon": hidden} if use_muon else {})}
        names = {id(p): re.sub(r"\.\d+\.", ".*.", name) for name, p in named.items()}
        lines = [(f"AdamW {g['name']}, lr {g['lr']:g}, weight decay {g['weight_decay']:g}", g["params"])
                 for g in adamw] + [("Muon", groups.get("muon", []))]
        summary = "\n".join(f"{line}: {len(ps)} tensors, {sum(p.numel() for p in ps):,} parameters "
                             f"({', '.join(sorted({names[id(p)] for p in ps}))})" for line, ps in lines if ps)
        return groups, summary

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len=None, full_attention=False):
        """Training FLOPs per token: 6 per matmul weight (2 forward, 4 backward) for every matrix that
        multiplies activations (all but the embedding lookup), plus attention's QK^T and AV.
        Causal attention is counted at half of the full T x T, the work flash attention actually does;
        full_attention counts all of it, as nanoGPT, nanochat and PaLM do (12 * L * H * d * T)."""
        a = self.args
        seq_len = seq_len or a.block_size
        matmul_params = self.num_params() - self.embed_tokens.weight.numel()
        if a.tie_embeddings:  # the shared matrix is used as lm_head, so it counts once
            matmul_params += self.lm_head.weight.numel()
        matmul_params -= sum(p.numel() for n, p in self.named_parameters() if p.dim() == 1)
        attention = (12 if full_attention else 6) * a.n_layer * a.n_head * a.head_dim * seq_len
        return 6 * matmul_params + attention

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, stop_token=None):
        """Continue idx (B, T) by max_new_tokens tokens with a KV cache; yields each new (B, 1) column.
        temperature=0 is greedy. When the context fills block_size, the cache is refilled from the
        most recent half so generation can go on past the trained length of context."""
        a = self.args
        dtype = self.embed_tokens.weight.dtype
        if torch.is_autocast_enabled(idx.device.type):
            dtype = torch.get_autocast_dtype(idx.device.type)
        idx = idx[:, -a.block_size:]
        cache = KVCache(a, idx.size(0), a.block_size, idx.device, dtype)
        logits = self(idx, cache=cache)[:, -1, :]
        context = idx
        for _ in range(max_new_tokens):
            logits = logits.float()
            logits[:, a.vocab_size:] = float("-inf")  # vocabulary padding is never sampled
            if temperature == 0:
                next_token = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, a.vocab_size)).values[:, -1:]
                    logits[logits < kth] = float("-inf")
                next_token = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            yield next_token
            if stop_token is not None and bool((next_token == stop_token).all()):
                return
            context = torch.cat((context, next_token), dim=1)
            if cache.length == a.block_size:
                context = context[:, -(a.block_size // 2):]
                cache.length = 0
                logits = self(context, cache=cache)[:, -1, :]
            else:
                logits = self(next_token, cache=cache)[:, -1, :]


def parameter_shapes(model_args):
    """{parameter name: shape} of the model these ModelArgs build (on the meta device: no memory)."""
    with torch.device("meta"):
        model = GPT(model_args)
    return {name: list(p.shape) for name, p in model.named_parameters()}
