# Stacked after any stage config, e.g. `python train.py configs/pretrain.py configs/tiny.py`:
# the same run shrunk to a few minutes on a laptop CPU, on the demo data from `python prepare.py`.
out_dir = out_dir + "-tiny"
data_dir = "data/demo"
n_layer = 4
n_head = 4
n_kv_head = 2
n_embd = 128
block_size = 128
micro_batch_size = 16
batch_size = 32
batch_size_schedule = None
max_iters = 600
warmup_iters = 30
learning_rate = 3e-3
min_lr = 3e-4
eval_interval = 200
eval_iters = 20
log_interval = 20
device = "cpu"
compile = False
