"""FSDP2 and HSDP (data_parallel='fsdp' / 'hsdp') with torchrun and gloo on the CPU: the same training as
DDP and one process, checkpoints that resume across modes and world sizes, and the memory it saves."""
import json
import os
import re
import shutil
import sys

import pytest
import torch

from infra.checkpoint import load_checkpoint
from conftest import TORCHRUN, assert_same_state, records, run_script

TINY = ["tests/tiny_model.py", "--eval_iters=2", "--log_interval=1", "--micro_batch_size=4", "--batch_size=8",
        "--learning_rate=1e-2", "--warmup_iters=2"]
MUON = ["--use_muon=True", "--muon_lr=1e-2"]


def train(*args, processes=1, check=True, env=None):
    """train.py with args (with Muon in fp32: tests/fp32_muon.py), in one process or under torchrun."""
    launcher = (sys.executable,) if processes == 1 else (*TORCHRUN[:-1], f"--nproc_per_node={processes}")
    script = "tests/fp32_muon.py" if "--use_muon=True" in args else "train.py"
    return run_script(script, *args, launcher=launcher, check=check, env=env)



def bytes_saved_for_backward(model, x, y):
    """The bytes autograd keeps from the forward pass for the backward (each storage counted once)."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(x, y, loss_reduction="sum")
    loss.backward()
    return sum(storages.values())


def test_the_chunked_loss_keeps_no_logits_under_fsdp2(tmp_path):
    # FSDP2's root (embedding, final norm, head, loss) runs uncompiled: unchunked, the loss keeps the
    # fp32 log-softmax of every token for the backward pass; chunked, only the head's and the input's gradients
    import torch.distributed as dist
    from model import GPT, ModelArgs
    from infra.parallel import wrap
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        args = ModelArgs(vocab_size=8192, block_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
        x = torch.randint(0, args.vocab_size, (8, args.block_size))
        saved, grads = {}, {}
        for chunk in (0, 256):
            with torch.device("meta"):
                gpt = GPT(args)
            gpt.loss_chunk_tokens = chunk
            model, _ = wrap(gpt, mode="fsdp", device="cpu", local_rank=0, world_size=1, shard_size=1, compile=False,
                            bf16=False, reshard_after_forward=True, seed=0)
            saved[chunk] = bytes_saved_for_backward(model, x, x.roll(-1, 1))
            grads[chunk] = [p.grad.full_tensor() for p in model.parameters()]
    finally:
        dist.destroy_process_group()
    logits_bytes = x.numel() * args.padded_vocab_size * 4  # 32 MB
    assert saved[0] - saved[256] > 0.9 * logits_bytes, saved
    for a, b in zip(grads[0], grads[256]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("variant", [[], MUON, ["chat"]], ids=["adamw", "muon", "masked"])
def test_fsdp_matches_ddp_and_one_process(data, tmp_path, variant):
    if variant == ["chat"]:
        variant = [f"--data_dir={data}-chat", "--use_loss_mask=True"]
    # the tasks: multiple choice and generation, under FSDP2 too in the same forward passes on every rank
    tasks = "--eval_tasks={'%s-tasks/next_line.jsonl': 6, '%s-tasks/identifier.jsonl': 5}" % (data, data)
    args = [*TINY, f"--data_dir={data}", *variant, "--max_iters=10", "--eval_interval=5", tasks]
    train(*args, f"--out_dir={tmp_path}/one")
    ddp = train(*args, f"--out_dir={tmp_path}/ddp", processes=2)
    # the tasks' examples split between ranks (5 generative ones: 3 and 2, the second rank running a padding one)
    assert "world size 2" in ddp.stdout and "step 0: scoring 2 tasks (11 examples)..." in ddp.stdout
    one_tasks = list(records(tmp_path / "one", "tasks").values())
    assert one_tasks[-1]["identifier"]["examples"] == 5 and one_tasks[-1]["next_line"]["examples"] == 6
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in load_checkpoint(str(tmp_path / "ddp"))["model"])
    # and activation checkpointing under FSDP2: recomputing each block changes nothing; or the
    # weights kept gathered from forward to backward (evaluation must shard them again after)
    extra = "--reshard_after_forward=False" if variant == MUON else "--activation_checkpointing=True"
    fsdp = train(*args, f"--out_dir={tmp_path}/fsdp", "--data_parallel=fsdp", extra, processes=2)
    assert "world size 2" in fsdp.stdout
    one = records(tmp_path / "one", "loss")
    assert sorted(one) == list(range(1, 11))
    for run in ("ddp", "fsdp"):
        assert records(tmp_path / run, "loss") == pytest.approx(one, rel=1e-5)
        assert records(tmp_path / run, "val_loss") == pytest.approx(records(tmp_path / "one", "val_loss"), rel=1e-5)
        for step, scores in records(tmp_path / "one", "tasks").items():
            assert all(records(tmp_path / run, "tasks")[step][name] == pytest.approx(s) for name, s in scores.items())
        assert_same_state(load_checkpoint(str(tmp_path / "one")), load_checkpoint(str(tmp_path / run)), exact=False)
    if not variant:  # AdamW: weights, gradients and two moments, 16 bytes per parameter; FSDP2 holds half a rank
        params = float(re.search(r"model: ([\d.]+)M parameters", ddp.stdout).group(1)) * 1e6
        state = {run: records(tmp_path / run, "state_mb_per_rank")[1] for run in ("ddp", "fsdp")}
        assert state["ddp"] == pytest.approx(params * 16 / 2**20, rel=0.01)
        assert state["fsdp"] == pytest.approx(state["ddp"] / 2, rel=0.02)


@pytest.mark.slow
def test_hsdp_on_a_two_by_two_mesh_matches_one_process(data, tmp_path):
    args = [*TINY, f"--data_dir={data}", *MUON, "--batch_size=16", "--max_iters=6", "--eval_interval=6"]
    train(*args, f"--out_dir={tmp_path}/one")
    hsdp = train(*args, f"--out_dir={tmp_path}/hsdp", "--data_parallel=hsdp", "--shard_size=2", processes=4)
    assert "world size 4" in hsdp.stdout
    assert records(tmp_path / "hsdp", "loss") == pytest.approx(records(tmp_path / "one", "loss"), rel=1e-5)
    # the two replica groups hold the same shards: the first group's are written, once
    meta = json.load(open(next((tmp_path / "hsdp").glob("ckpt_*")) / "meta.json"))
    assert {file for entry in meta["tensors"].values() for file, _, _ in entry["pieces"]} == {
        "rank-00000.safetensors", "rank-00001.safetensors"}
    assert_same_state(load_checkpoint(str(tmp_path / "one")), load_checkpoint(str(tmp_path / "hsdp")), exact=False)
    result = train(
        *args, f"--out_dir={tmp_path}/bad", "--data_parallel=hsdp", "--shard_size=3", processes=4, check=False
    )
    assert result.returncode != 0 and "multiple of shard_size (3)" in result.stderr


def resume(tmp_path, source, name, args, processes, mode):
    """A run that starts from source's checkpoint at step 6 and trains on to step 12."""
    os.makedirs(tmp_path / name)
    shutil.copytree(tmp_path / source / "ckpt_0000006", tmp_path / name / "ckpt_0000006")
    result = train(*args, f"--out_dir={tmp_path}/{name}", "--init_from=resume", f"--data_parallel={mode}",
                   processes=processes)
    assert "resumed from" in result.stdout and f"world size {processes}" in result.stdout


@pytest.mark.slow
def test_checkpoints_resume_across_modes_and_world_sizes(data, tmp_path):
    args = [*TINY, f"--data_dir={data}", *MUON, "--max_iters=12", "--eval_interval=6"]
    train(*args, f"--out_dir={tmp_path}/fsdp", "--data_parallel=fsdp", processes=2)
    train(*args, f"--out_dir={tmp_path}/ddp", processes=2)
    # FSDP2(2) -> FSDP2(2): bit-identical to the run that never stopped
    resume(tmp_path, "fsdp", "fsdp_fsdp", args, 2, "fsdp")
    assert_same_state(load_checkpoint(str(tmp_path / "fsdp")), load_checkpoint(str(tmp_path / "fsdp_fsdp")), exact=True)
    assert {s: loss for s, loss in records(tmp_path / "fsdp", "loss").items() if s > 6} == records(
        tmp_path / "fsdp_fsdp", "loss"
    )
    # FSDP2(2) -> one process (DDP's code path), and DDP(2) -> FSDP2(2): the same training, to rounding
    resume(tmp_path, "fsdp", "fsdp_one", args, 1, "ddp")
    assert_same_state(load_checkpoint(str(tmp_path / "fsdp")), load_checkpoint(str(tmp_path / "fsdp_one")), exact=False)
    resume(tmp_path, "ddp", "ddp_fsdp", args, 2, "fsdp")
    assert_same_state(load_checkpoint(str(tmp_path / "ddp")), load_checkpoint(str(tmp_path / "ddp_fsdp")), exact=False)
    # and what each wrote at step 6 is the same state, whichever mode wrote it
    fsdp_half, ddp_half = (load_checkpoint(str(tmp_path / run / "ckpt_0000006")) for run in ("fsdp", "ddp"))
    torch.testing.assert_close(fsdp_half["model"], ddp_half["model"], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_export_and_sample_from_an_fsdp_checkpoint(data, tmp_path):
    transformers = pytest.importorskip("transformers")
    from infra.checkpoint import model_from_checkpoint
    import tokenizer as tok
    train(*TINY, f"--data_dir={data}", "--max_iters=4", "--eval_interval=4", f"--out_dir={tmp_path}/fsdp",
          "--data_parallel=fsdp", processes=2)
    model, encoder = model_from_checkpoint(load_checkpoint(str(tmp_path / "fsdp")))
    run_script("export_hf.py", f"--ckpt={tmp_path}/fsdp", f"--hf_dir={tmp_path}/hf", "--dtype=float32")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    idx = torch.tensor([encoder.encode("def main():\n    return 0\n")])
    with torch.no_grad():
        assert (
            hf_model(idx).logits[..., : encoder.n_vocab] - model.eval()(idx)[..., : encoder.n_vocab]
        ).abs().max() < 1e-4
        bos = tok.bos_id(encoder)  # sample.py starts a document as training did, and stops at the next
        generated = [
            int(t) for t in model.generate(torch.tensor([[bos] + encoder.encode_ordinary("def ")]), 8, temperature=0)
        ]
        expected = encoder.decode(generated[:generated.index(bos)] if bos in generated else generated)
    result = run_script("sample.py", f"--out_dir={tmp_path}/fsdp", "--start=def ", "--num_samples=1",
                        "--max_new_tokens=8", "--temperature=0", "--device=cpu")
    assert result.stdout == "def " + expected + "\n"


@pytest.mark.slow
def test_every_mode_and_world_size_starts_from_the_same_weights(tmp_path):
    # built on the meta device, each rank draws only the rows it holds, each parameter from its own
    # generator seeded by (seed, name): the same values whole, sharded over 1 rank or 2, or replicated
    from safetensors.torch import load_file
    runs = {"one process": ("ddp", (sys.executable,)), "ddp on 2": ("ddp", TORCHRUN),
            "fsdp on 1": ("fsdp", (*TORCHRUN[:-1], "--nproc_per_node=1")), "fsdp on 2": ("fsdp", TORCHRUN)}
    weights = {}
    for name, (mode, launcher) in runs.items():
        run_script("tests/initial_weights.py", mode, str(tmp_path / f"{name}.safetensors"), launcher=launcher)
        weights[name] = load_file(str(tmp_path / f"{name}.safetensors"))
    reference = weights["one process"]
    assert reference["layers.0.self_attn.q_proj.weight"].std().item() == pytest.approx(0.02, rel=0.1)
    for name, tensors in weights.items():
        assert tensors.keys() == reference.keys() and all(torch.equal(tensors[k], reference[k]) for k in tensors), name
