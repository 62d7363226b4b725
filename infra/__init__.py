"""
The machinery under the commands, which a first reading can skip: where a run starts (resume.py),
the checkpoint format (checkpoint.py), the run directory and how a run ends (rundir.py), data and
model parallelism (parallel.py), the device (device.py), config checks (settings.py) and the
Hugging Face import (import_hf.py). model.py, muon.py and data.py import nothing from here.
"""
