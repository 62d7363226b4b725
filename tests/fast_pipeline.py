# An overlay after configs/tiny.py for the pipeline test: a few steps per stage, and every run
# directory under $PIPELINE_TEST_OUT instead of out/.
import os

_root = os.environ["PIPELINE_TEST_OUT"]
out_dir = os.path.join(_root, os.path.basename(out_dir))
if init_from not in ("scratch", "resume"):
    init_from = os.path.join(_root, os.path.basename(init_from))
max_iters = 8
warmup_iters = 2
eval_interval = 4
eval_iters = 2
log_interval = 2
