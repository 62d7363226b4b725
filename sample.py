"""
Sample from a trained model, streaming the text as it is generated:
    python sample.py --out_dir=out/pretrain-tiny --start="def "
    python sample.py --ckpt=out/pretrain/ckpt_0040000 --start=FILE:prompt.txt --temperature=0
    python sample.py --out_dir=out/finetune-tiny --prompt="What does json.dumps do?"   # one chat turn
    python sample.py --out_dir=out/finetune-tiny --chat=True                           # chat on stdin
"""
import codecs
import os
import sys

# ----------------------------------------------------------------------------------------------
out_dir = "out/run"         # a run directory: its newest checkpoint is used
ckpt = ""                   # or one checkpoint (a ckpt_<step> directory)
start = ""                  # text to continue, or FILE:path to read it from a file
prompt = ""                 # chat: one user message, answered through the chat template
chat = False                # chat: an interactive conversation on stdin
system = ""                 # chat: an optional system message
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

from infra.settings import sample_problem  # noqa: E402
if problem := sample_problem(globals()):
    sys.exit(f"sample.py: error: {problem}")

import torch  # after the config: --help answers without loading torch

from infra.checkpoint import load_checkpoint, model_from_checkpoint
from infra.device import resolve_device
import tokenizer as tok

torch.manual_seed(seed)
try:
    if start.startswith("FILE:"):
        with open(start[5:], encoding="utf-8") as f:
            start = f.read()
    device, device_type, dtype, autocast = resolve_device(device, dtype)
    checkpoint = load_checkpoint(ckpt or out_dir)
except (OSError, ValueError) as e:
    sys.exit(f"sample.py: error: {e}")
model, encoder = model_from_checkpoint(checkpoint, device)
model.eval()
if compile:
    model = torch.compile(model)
print(f"# {checkpoint['path']} (step {checkpoint['step']})", file=sys.stderr)


def stream(ids):
    """Generate from ids, printing each character as soon as its bytes are complete, until a stop token."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a token can end mid-character
    generated = []
    with autocast:
        for token in model.generate(torch.tensor([ids], device=device), max_new_tokens, temperature=temperature,
                                    top_k=top_k):
            token_id = token.item()
            if token_id in stops:
                break
            generated.append(token_id)
            sys.stdout.write(decoder.decode(encoder.decode_single_token_bytes(token_id)))
            sys.stdout.flush()
    sys.stdout.write(decoder.decode(b"", final=True) + "\n")
    return encoder.decode(generated)


# where the export's generation config stops (its eos_token_id): a new document, or the end of a turn
bos = tok.bos_id(encoder)
stops = {bos, encoder._special_tokens["<|im_end|>"]}
if prompt or chat:
    messages = [{"role": "system", "content": system}] if system else []
    turns = [prompt] if prompt else iter(lambda: input("> "), None)
    try:
        for user_text in turns:
            messages.append({"role": "user", "content": user_text})
            ids, _ = tok.encode_chat(encoder, messages, add_generation_prompt=True)
            messages.append({"role": "assistant", "content": stream(ids)})
    except (EOFError, KeyboardInterrupt):
        print()
    sys.exit(0)

for sample in range(num_samples):
    sys.stdout.write(start)
    stream([bos] + encoder.encode_ordinary(start))
    if sample < num_samples - 1:
        print("-" * 40)
