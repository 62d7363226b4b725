# The tests' model, as a config overlay (python train.py tests/tiny_model.py --data_dir=...): small
# enough that a step takes milliseconds on a CPU.
n_layer = 2
n_head = 4
n_kv_head = 2
n_embd = 64
block_size = 64
device = "cpu"
compile = False
