"""
Sample from a trained model, streaming the text as it is generated:
    python sample.py --out_dir=out/pretrain-tiny --start="def "
    python sample.py --ckpt=out/pretrain/ckpt_0040000.pt --start=FILE:prompt.txt --temperature=0
"""
import codecs
import os
import sys
from contextlib import nullcontext

import torch

# ----------------------------------------------------------------------------------------------
out_dir = "out/run"         # a run directory: its newest checkpoint is used
ckpt = ""                   # or one checkpoint file
start = ""                  # the prompt, or FILE:path to read it from a file
num_samples = 3
max_new_tokens = 200
temperature = 0.8           # 0: greedy
top_k = 200                 # sample only among the k most likely tokens; 0: all
seed = 1337
device = "auto"
dtype = "auto"              # 'auto': bfloat16 on cuda, float32 on cpu
compile = False
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
# ----------------------------------------------------------------------------------------------

from checkpoint import load_checkpoint, model_from_checkpoint
import tokenizer as tok

if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
device_type = "cuda" if device.startswith("cuda") else "cpu"
if dtype == "auto":
    dtype = "bfloat16" if device_type == "cuda" else "float32"
autocast = torch.autocast(device_type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
torch.manual_seed(seed)

try:
    checkpoint = load_checkpoint(ckpt or out_dir, device)
except (FileNotFoundError, ValueError) as e:
    sys.exit(f"sample.py: error: {e}")
model, encoder = model_from_checkpoint(checkpoint, device)
model.eval()
if compile:
    model = torch.compile(model)
print(f"# {checkpoint['path']} (step {checkpoint['step']})", file=sys.stderr)

if start.startswith("FILE:"):
    with open(start[5:], encoding="utf-8") as f:
        start = f.read()
bos = tok.bos_id(encoder)
prompt = torch.tensor([[bos] + encoder.encode_ordinary(start)], device=device)

for sample in range(num_samples):
    # tokens can end mid-character: an incremental decoder prints each character once it is complete
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    sys.stdout.write(start)
    with autocast:
        for token in model.generate(prompt, max_new_tokens, temperature=temperature, top_k=top_k, stop_token=bos):
            token_id = token.item()
            if token_id != bos:
                sys.stdout.write(decoder.decode(encoder.decode_single_token_bytes(token_id)))
                sys.stdout.flush()
    sys.stdout.write(decoder.decode(b"", final=True) + "\n" + ("-" * 40 if sample < num_samples - 1 else "") + "\n")
