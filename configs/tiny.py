# Stacked after any stage config, e.g. `python train.py configs/pretrain.py configs/tiny.py`:
# the same stage shrunk to a few minutes on a laptop CPU, on the demo data from `python prepare.py`
# (data/demo for text, data/demo-chat for conversations).
if out_dir == "out/run":  # train.py's default: no stage config came first
    raise ValueError("configs/tiny.py shrinks a stage: name the stage first, e.g. "
                     "python train.py configs/pretrain.py configs/tiny.py")
out_dir = out_dir + "-tiny"
if init_from.startswith("out/"):  # the previous stage's tiny run
    init_from = init_from + "-tiny"
data_dir = "data/demo-chat" if use_loss_mask else "data/demo"
if data_mixture:
    data_mixture = {"data/demo": 0.6, "data/demo-chat": 0.4}
# the model (later stages take theirs from the checkpoint)
n_layer = 4
n_head = 4
n_kv_head = 2
n_embd = 128
block_size = 128
micro_batch_size = 16
batch_size = 32
batch_size_schedule = None
_pretraining = not data_mixture and not use_loss_mask  # the stage on plain text, from scratch
max_iters = 600 if _pretraining else 200
warmup_iters = max_iters // 20
learning_rate = learning_rate * 5  # a small model takes a larger learning rate
min_lr = min_lr * 5
muon_lr = muon_lr * 5
eval_interval = max_iters // 2
eval_iters = 10                 # 160 windows: the demo chat set's val split holds about 300 conversations
# the demo's tasks, on the demo's data only: they say nothing of a model trained on other data
_demo = all(d.startswith("data/demo") for d in (data_mixture or [data_dir]))
eval_tasks = (
    {f"data/demo-tasks/{_task}.jsonl": 100 for _task in ("next_line", "identifier", "docstring")} if _demo else {}
)
log_interval = 20
device = "cpu"
# compiled, a step takes about 20% less time on the CPU; compiling costs ~35 s the first time, a few
# seconds later on (torch's compile cache in /tmp): it pays back within the first stage (dev/LOG.md)
compile = True
