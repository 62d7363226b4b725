# Midtraining (continued pretraining) on 8xH100, from the newest pretrain checkpoint:
#   torchrun --standalone --nproc_per_node=8 train.py configs/midtrain.py
# The model shape comes from the checkpoint. The mixture adds chat-formatted data, learned on every
# token, so the model meets the chat template before finetuning. Prepare the chat set with the
# pretrain tokenizer:
#   python prepare.py HuggingFaceTB/smoltalk --hf_config=all --chat --tokenizer=data/fineweb-edu --out=data/smoltalk
out_dir = "out/midtrain"
init_from = "out/pretrain"
# a handoff starts a fresh AdamW (step 0, new schedule) from the weights, Muon-trained or not
data_mixture = {"data/fineweb-edu": 0.7, "data/smoltalk": 0.3}
use_loss_mask = False
micro_batch_size = 8
batch_size = 128
learning_rate = 2e-4            # a third of pretraining's peak, a short warmup, then straight down to 0
min_lr = 0.0
lr_schedule = "linear"
warmup_iters = 100
max_iters = 4000
eval_interval = 500
eval_iters = 40
log_interval = 10
