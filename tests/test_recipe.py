"""The recipe's settings, each doing what its --help says: initialisation scales, per-group learning
rates, Polar Express, cautious weight decay, the momentum cool-down, aligned windows and document masking."""
import json
import os

import numpy as np
import pytest
import torch

from data import open_dataset, sample_windows
from model import GPT, Init, ModelArgs
import muon
from muon import Muon, newton_schulz
from tests.test_muon import ROOT, with_spectrum

ARGS = ModelArgs(vocab_size=256, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)


def test_init_scales_and_zero_projections():
    model = GPT(ARGS)
    model.init = Init(embed_std=0.8, head_std=0.001, zero_projections=True)
    model.init_weights(seed=3)
    params = dict(model.named_parameters())
    assert abs(params["embed_tokens.weight"].std().item() - 0.8) < 0.02
    assert abs(params["lm_head.weight"].std().item() - 0.001) < 2e-5
    assert abs(params["layers.0.self_attn.q_proj.weight"].std().item() - 0.02) < 1e-3
    projections = [p for n, p in params.items() if n.endswith(("o_proj.weight", "down_proj.weight"))]
    assert len(projections) == 4 and all(p.count_nonzero() == 0 for p in projections)
    default = GPT(ARGS)
    default.init_weights(seed=3)
    assert default.layers[0].self_attn.o_proj.weight.std().item() == pytest.approx(0.02 / 2, rel=0.05)


@pytest.mark.parametrize("use_muon", [False, True])
def test_each_adamw_group_has_its_learning_rate_and_decay(use_muon):
    model = GPT(ARGS)
    by_optimizer, summary = model.param_groups(learning_rate=1e-3, weight_decay=0.1, embed_lr=2e-2, head_lr=5e-4,
                                               norm_lr=None, decay_embed_head=False, use_muon=use_muon)
    groups = {g["name"]: g for g in by_optimizer["adamw"]}
    assert groups["embedding"]["params"][0] is model.embed_tokens.weight
    assert groups["head"]["params"][0] is model.lm_head.weight
    assert (groups["embedding"]["lr"], groups["head"]["lr"], groups["norms"]["lr"]) == (2e-2, 5e-4, 1e-3)
    assert groups["embedding"]["lr_scale"] == 20 and groups["norms"]["lr_scale"] == 1.0
    assert groups["embedding"]["weight_decay"] == groups["head"]["weight_decay"] == groups["norms"]["weight_decay"] == 0
    assert ("matrices" in groups) != use_muon and "AdamW embedding, lr 0.02, weight decay 0" in summary
    every = [p for g in by_optimizer["adamw"] for p in g["params"]] + by_optimizer.get("muon", [])
    assert sorted(map(id, every)) == sorted(map(id, model.parameters()))  # each parameter exactly once


def test_polar_express_is_closer_to_orthogonal_than_newton_schulz():
    G = torch.stack([with_spectrum(64, 128, 1e-2, seed) for seed in range(4)])
    errors = {}
    for method in ("newton_schulz", "polar_express"):
        singular_values = torch.linalg.svdvals(newton_schulz(G, method=method).float())
        errors[method] = (singular_values - 1).abs().max().item()
    assert errors["polar_express"] < errors["newton_schulz"] and errors["polar_express"] < 0.2


def test_cautious_decay_decays_only_where_the_update_points_towards_zero():
    torch.manual_seed(0)
    start = torch.randn(16, 16)
    weights = {c: torch.nn.Parameter(start.clone()) for c in (False, True)}
    grad = torch.randn(16, 16)
    steps = {}
    for cautious, p in weights.items():
        before = p.detach().clone()
        p.grad = grad.clone()
        opt = Muon([p], lr=0.1, weight_decay=0.5, momentum=0.0, nesterov=False, cautious_decay=cautious)
        opt.step()
        steps[cautious] = (before, p.detach().clone())
    before, plain = steps[False]
    _, cautious = steps[True]
    update = plain - before * (1 - 0.1 * 0.5)  # the orthogonalized step, the same in both
    towards_zero = update * before < 0
    assert 0 < towards_zero.sum() < towards_zero.numel()
    assert torch.allclose(cautious[towards_zero], plain[towards_zero])
    assert torch.allclose(cautious[~towards_zero], (before + update)[~towards_zero], atol=1e-6)


def test_neuron_norm_moves_every_neuron_at_the_same_rate_and_keeps_the_step_size(monkeypatch):
    monkeypatch.setattr(muon, "NS_DTYPE", torch.float32)
    torch.manual_seed(0)
    # a tall matrix (its neurons are rows) with a rank-2 gradient whose rows differ ~30x in size:
    # orthogonalized, its rows stay uneven
    rows = torch.logspace(0, 1.5, 64)[:, None]
    grad = rows * (torch.randn(64, 1) @ torch.randn(1, 32) + torch.randn(64, 1) @ torch.randn(1, 32))
    steps = {}
    for neuron_norm in (False, True):
        p = torch.nn.Parameter(torch.zeros(64, 32))
        opt = Muon([p], lr=0.1, momentum=0.0, nesterov=False, neuron_norm=neuron_norm)
        for _ in range(2):  # the second step's update divides by the running mean square of two
            before = p.detach().clone()
            p.grad = grad.clone()
            opt.step()
        steps[neuron_norm] = p.detach() - before
    row_norms = {k: step.norm(dim=1) for k, step in steps.items()}
    assert row_norms[False].max() / row_norms[False].min() > 5  # plain Muon: uneven neurons
    assert row_norms[True].max() / row_norms[True].min() < 1.01  # NorMuon: one rate for all
    torch.testing.assert_close(steps[True].norm(), steps[False].norm(), rtol=1e-4, atol=0)


def test_document_masking_keeps_each_document_to_itself():
    torch.manual_seed(0)
    model = GPT(ARGS)
    bos = 255
    first, second = torch.randint(0, 200, (1, 11)), torch.randint(0, 200, (1, 20))
    second[0, 0] = bos
    both = torch.cat([first, second], dim=1)
    model.document_token = bos
    with torch.no_grad():
        masked = model(both)
        alone = model(second)
        prefix = model(first)
    # RoPE makes attention depend on relative positions only: the second document at offset 11 sees what it sees alone
    assert torch.allclose(masked[:, 11:], alone, atol=1e-4)
    assert torch.allclose(masked[:, :11], prefix, atol=1e-5)
    model.document_token = None
    with torch.no_grad():
        unmasked = model(both)
    assert not torch.allclose(unmasked[:, 11:], alone, atol=1e-2)


def test_aligned_windows_start_at_a_document(data):
    meta = json.load(open(os.path.join(data, "meta.json")))
    dataset = open_dataset(data, 64, align_to_documents=True)
    windows = sample_windows([dataset], [1.0], "train", 50, (1, 2))
    tokens = dataset.tokens["train"]
    assert all(tokens[shard][offset] == meta["bos_id"] for _, shard, offset in windows)
    anywhere = sample_windows([open_dataset(data, 64)], [1.0], "train", 50, (1, 2))
    assert np.mean([tokens[shard][offset] == meta["bos_id"] for _, shard, offset in anywhere]) < 0.5


@pytest.fixture(scope="module")
def defaults():
    """train.py's default config, as a dict (train.py --print_config writes it as a config file)."""
    import subprocess
    import sys
    text = subprocess.run([sys.executable, "train.py", "--print_config"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout
    config = {}
    exec(text, {}, config)
    return config


@pytest.mark.parametrize("setting, message", [
    ({"muon_orthogonalize": "svd"}, "muon_orthogonalize must be one of 'newton_schulz', 'polar_express', got 'svd'"),
    ({"embed_lr": -1.0}, "embed_lr must be a finite number >= 0, got -1.0"),
    ({"init_head_std": float("inf")}, "init_head_std must be a finite number >= 0, got inf"),
    ({"muon_momentum_cooldown_steps": -3}, "muon_momentum_cooldown_steps must not be negative, got -3"),
    ({"val_full_pass": "yes"}, "val_full_pass must be one of True, False, None, got 'yes'"),
    ({"use_muon": True, "muon_lr": 0.0}, "muon_lr must be a finite number > 0, got 0.0"),
])
def test_each_bad_setting_is_named(defaults, setting, message):
    from infra.settings import config_problem
    assert config_problem(defaults, world_size=1) is None
    assert config_problem({**defaults, **setting}, world_size=1) == message


def test_a_batch_the_micro_batches_cannot_fill_is_named():
    from infra.settings import batch_size_problem
    assert batch_size_problem({32, 64}, micro_batch_size=8, world_size=2) is None
    assert batch_size_problem({32, 40}, micro_batch_size=8, world_size=2) == (
        "batch size 40 is not a multiple of micro_batch_size x world_size = 8 x 2 = 16; use e.g. 32 or 48")


def test_wsd_decay_shape_and_muon_momentum_schedule(data, tmp_path):
    from conftest import TINY_RUN, records, train
    train(*TINY_RUN, f"--data_dir={data}", f"--out_dir={tmp_path}", "--max_iters=10", "--eval_iters=0",
          "--lr_schedule=wsd", "--wsd_decay_frac=0.5", "--wsd_decay_shape=sqrt", "--min_lr=1e-3", "--use_muon=True",
          "--muon_momentum_warmup_steps=4", "--muon_momentum_cooldown_steps=2")
    # a record at step n holds the values of the step just taken, n - 1
    lr = {step - 1: value for step, value in records(tmp_path, "lr").items()}
    momentum = {step - 1: value for step, value in records(tmp_path, "muon_momentum").items()}
    peak, low = 1e-2, 1e-3
    assert lr[0] == pytest.approx(peak / 2) and lr[4] == pytest.approx(peak)  # warmup, then stable to step 5
    assert lr[7] == pytest.approx(low + (peak - low) * (1 - (2 / 5) ** 0.5))  # decay over steps 5..10, sqrt-shaped
    assert momentum[0] == pytest.approx(0.85) and momentum[2] == pytest.approx(0.90)
    assert momentum[5] == pytest.approx(0.95) and momentum[9] == pytest.approx(0.85 + 0.1 / 2)  # cool-down
