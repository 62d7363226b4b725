# An overlay after configs/tiny.py for the pipeline test: a few steps per stage.
max_iters = 8
warmup_iters = 2
eval_interval = 4
eval_iters = 2
log_interval = 2
compile = False  # 8 steps a stage: compiling would not pay
eval_tasks = {_path: 10 for _path in eval_tasks}  # the demo tasks, 10 examples each
