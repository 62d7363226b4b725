# Chat finetuning on 8xH100, from the newest midtrain checkpoint:
#   torchrun --standalone --nproc_per_node=8 train.py configs/finetune.py
# Only the assistant's words (and the <|im_end|> that ends each turn) are learned.
out_dir = "out/finetune"
init_from = "out/midtrain"
data_dir = "data/smoltalk"
data_mixture = None
use_loss_mask = True
micro_batch_size = 8
batch_size = 64
learning_rate = 5e-5
min_lr = 0.0
lr_schedule = "linear"
warmup_iters = 50
max_iters = 1000
eval_interval = 250
eval_iters = 40
log_interval = 10
