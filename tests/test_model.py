import math

import pytest
import torch

from model import GPT, ModelArgs


def small_model(**overrides):
    torch.manual_seed(0)
    args = dict(vocab_size=100, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    return GPT(ModelArgs(**{**args, **overrides})).eval()


def greedy_without_cache(model, idx, steps):
    for _ in range(steps):
        logits = model(idx)[:, -1, :model.args.vocab_size]
        idx = torch.cat((idx, logits.argmax(-1, keepdim=True)), dim=1)
    return idx


@pytest.mark.parametrize(
    "overrides", [{}, {"qk_norm": True, "tie_embeddings": True}, {"n_kv_head": 4}, {"n_kv_head": 1}]
)
def test_kv_cache_generation_matches_full_recomputation(overrides):
    model = small_model(**overrides)
    prompt = torch.randint(0, 100, (2, 5))
    cached = torch.cat(list(model.generate(prompt, 20, temperature=0)), dim=1)
    assert torch.equal(cached, greedy_without_cache(model, prompt, 20)[:, 5:])


def test_generation_continues_past_block_size_and_never_samples_padding():
    model = small_model()
    with torch.no_grad():  # make the padding rows (100..127) the most likely by far, were they allowed
        model.lm_head.weight[100:] = 10 * model.lm_head.weight.abs().max()
    out = torch.cat(list(model.generate(torch.zeros(1, 30, dtype=torch.long), 50, temperature=1.0, top_k=0)), dim=1)
    assert out.shape == (1, 50) and out.max() < 100


def test_attention_is_causal():
    model = small_model()
    idx = torch.randint(0, 100, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 100
    a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6) and not torch.allclose(a[:, 10:], b[:, 10:])


def test_loss_ignores_minus_one_and_matches_per_token_mean():
    model = small_model()
    idx = torch.randint(0, 100, (2, 8))
    targets = torch.randint(0, 100, (2, 8))
    per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == (2, 8)
    assert torch.allclose(model(idx, targets), per_token.mean())
    targets[:, :4] = -1
    assert torch.allclose(model(idx, targets), per_token[:, 4:].mean())


def test_the_chunked_loss_and_its_gradients_are_the_unchunked_ones():
    model = small_model()
    idx, targets = torch.randint(0, 100, (3, 16)), torch.randint(0, 100, (3, 16))
    targets[1, 3:9] = -1
    results = {}
    for chunk in (0, 7):  # 48 tokens: six chunks of 7 and one of 6
        model.zero_grad(set_to_none=True)
        model.loss_chunk_tokens = chunk
        for reduction in ("sum", "mean"):
            loss = model(idx, targets, loss_reduction=reduction)
            loss.backward()
            results[chunk, reduction] = loss.detach()
        results[chunk] = [p.grad.clone() for p in model.parameters()]
    for reduction in ("sum", "mean"):
        assert torch.allclose(results[7, reduction], results[0, reduction], rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(results[7], results[0]))
    assert results[0][-1].abs().sum() > 0  # the head's gradient is there to compare


def test_evaluation_runs_the_head_a_chunk_at_a_time_with_the_same_losses():
    # without gradients (validation, task scoring) the loss is computed loss_chunk_tokens rows at a time
    model = small_model()
    idx, targets = torch.randint(0, 100, (3, 16)), torch.randint(0, 100, (3, 16))
    targets[0, :5] = -1
    rows_seen = []
    model.lm_head.register_forward_hook(lambda module, args, out: rows_seen.append(out.shape[:-1].numel()))
    with torch.no_grad():
        whole = {r: model(idx, targets, loss_reduction=r) for r in ("none", "sum", "mean")}
        model.loss_chunk_tokens = 10
        chunked = {r: model(idx, targets, loss_reduction=r) for r in ("none", "sum", "mean")}
    assert rows_seen == [48] * 3 + [10, 10, 10, 10, 8] * 3  # 48 tokens: whole, then in chunks of 10
    assert chunked["none"].shape == (3, 16) and (chunked["none"][0, :5] == 0).all()
    for r in whole:
        assert torch.allclose(chunked[r], whole[r], rtol=1e-5, atol=1e-6)


def test_shapes_padding_and_init():
    model = small_model(vocab_size=130, n_layer=8)
    args = model.args
    assert model.embed_tokens.weight.shape == (256, 32) and args.mlp_hidden_dim == 128
    assert model.layers[0].self_attn.k_proj.weight.shape == (2 * 8, 32)  # n_kv_head * head_dim
    # residual projections start smaller by 1/sqrt(2 * n_layer)
    q_std = torch.cat([layer.self_attn.q_proj.weight.flatten() for layer in model.layers]).std().item()
    o_std = torch.cat([layer.self_attn.o_proj.weight.flatten() for layer in model.layers]).std().item()
    assert q_std == pytest.approx(0.02, rel=0.1) and o_std == pytest.approx(0.02 / math.sqrt(16), rel=0.1)
    # no biases anywhere: every vector is a norm's gain, every other parameter a matrix
    assert not any("bias" in n for n, _ in model.named_parameters())
    assert all(p.dim() > 1 for n, p in model.named_parameters() if "norm" not in n)
    assert all(p.dim() == 1 for n, p in model.named_parameters() if "norm" in n)


def test_flops_per_token_by_hand():
    model = small_model()
    a = model.args
    hd = a.head_dim
    per_layer = a.n_embd * (a.n_head * hd) * 2 + a.n_embd * (a.n_kv_head * hd) * 2 + 3 * a.n_embd * a.mlp_hidden_dim
    matmul_params = a.n_layer * per_layer + a.n_embd * a.padded_vocab_size
    assert model.flops_per_token() == 6 * matmul_params + 6 * a.n_layer * a.n_head * hd * a.block_size
    tied = small_model(tie_embeddings=True)
    assert tied.flops_per_token() == model.flops_per_token()


def test_bad_shapes_are_reported():
    with pytest.raises(ValueError, match="n_head=4 is not divisible by n_kv_head=3"):
        small_model(n_kv_head=3)
