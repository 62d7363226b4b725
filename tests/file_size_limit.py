"""Runs train.py (or the script SCRIPT names) with the largest file it may write capped at
FILE_SIZE_LIMIT bytes (for test_failures.py): a write past it fails with EFBIG ('File too large'), as
on a full disk."""
import os
import resource
import runpy
import signal
import sys

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails instead of killing the process
limit = int(os.environ["FILE_SIZE_LIMIT"])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, root)
sys.argv = [os.path.join(root, os.environ.get("SCRIPT", "train.py"))] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
