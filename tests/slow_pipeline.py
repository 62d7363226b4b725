# An overlay after configs/tiny.py for the interrupt test: a pretrain long enough to press Ctrl-C in.
max_iters = 400
eval_interval = 200
log_interval = 1
compile = False
eval_tasks = {}
