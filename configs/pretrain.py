# Pretraining on 8xH100: `torchrun --standalone --nproc_per_node=8 train.py configs/pretrain.py`.
# Data: FineWeb-Edu, prepared with the GPT-2 tokenizer (see README):
#   python prepare.py HuggingFaceFW/fineweb-edu --hf_config=sample-10BT --tokenizer=gpt2 --out=data/fineweb-edu
out_dir = "out/pretrain"
data_dir = "data/fineweb-edu"
# ~1.0B parameters with 4 query heads per key/value head
n_layer = 20
n_embd = 2048
n_head = 32
n_kv_head = 8
block_size = 2048
# 8 sequences per micro-step per GPU, 16 micro-steps per step in all: with 8 GPUs that is
# 2 accumulation steps per GPU, 128 x 2048 = 262k tokens per optimizer step
micro_batch_size = 8
batch_size = 128
learning_rate = 6e-4
min_lr = 6e-5
# the recipe measured best on the tiny pretrain (BENCHMARKS.md, "The recipe"): Muon for the hidden matrices
# and QK-norm (the Qwen3 layout on export); --use_muon=False --qk_norm=False is plain AdamW Llama
use_muon = True
muon_lr = 6e-4
qk_norm = True
lr_schedule = "wsd"
wsd_decay_frac = 0.2
max_iters = 40000   # 40k x 262k = 10.5B tokens, about one pass over fineweb-edu sample-10BT
warmup_iters = 1000
eval_interval = 1000
eval_iters = 40
log_interval = 10
