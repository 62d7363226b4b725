"""
Files that must never be lost or half-written, outside the checkpoints themselves:
    lock_run_directory     one run per out_dir (flock on out_dir/.lock, released on every exit)
    catch_stop_signals     SIGTERM / SIGUSR1 / Ctrl-C recorded, so train.py stops with a checkpoint
    append_line            a metrics.jsonl line appended whole or not at all
    replace_directory      a finished dataset or export swapped in for an older one, and only over a
                           directory that holds nothing but what the same tool writes
"""
import atexit
import fnmatch
import os
import shutil
import signal
import sys

_lock_file = None  # held open (and locked) for the whole run


def lock_run_directory(out_dir):
    """Take out_dir for this process: an exclusive lock on out_dir/.lock. The kernel drops it when the
    process ends however it ends, so a lock left by a killed run is simply taken over; every exit
    through Python empties it too (no PID left behind). Raises RuntimeError naming the PID of a run
    that holds it, or saying why out_dir cannot be used."""
    global _lock_file
    import fcntl
    path = os.path.join(out_dir, ".lock")
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock_file = open(path, "a+")
    except OSError as e:
        raise RuntimeError(f"cannot use {out_dir} as the run directory ({e.strerror}): choose a writable --out_dir") from None
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        holder = lock_file.read().strip() or "unknown"
        lock_file.close()
        raise RuntimeError(f"{out_dir} is in use by another run (PID {holder}): wait for it to end, or choose "
                           f"another --out_dir") from None
    lock_file.seek(0)
    previous = lock_file.read().strip()
    if previous:
        print(f"{out_dir}: taking over the lock of an earlier run (PID {previous}) that ended without releasing it",
              flush=True)
    lock_file.truncate(0)
    lock_file.write(f"{os.getpid()}\n")
    lock_file.flush()
    _lock_file = lock_file
    atexit.register(release_run_directory)


def release_run_directory():
    """The lock file emptied (no PID left behind), then released."""
    global _lock_file
    if _lock_file is not None:
        _lock_file.truncate(0)
        _lock_file.close()
        _lock_file = None


_stop = {"signal": None}


def catch_stop_signals(rank):
    """From now on SIGTERM / SIGUSR1 (what SLURM and cloud schedulers send before they kill) and
    Ctrl-C are only recorded, for stop_signal(): train.py then finishes its step, checkpoints and
    exits. A second signal exits at once (a checkpoint being written stays a *.tmp)."""
    def on_signal(signum, frame):
        if _stop["signal"] is not None:
            os._exit(128 + signum)
        _stop["signal"] = signum
        print(f"rank {rank}: got {signal.Signals(signum).name}; stopping after this step with a checkpoint "
              f"(a second signal stops at once)", file=sys.stderr, flush=True)
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(signum, on_signal)


def stop_signal():
    """The stop signal received, or None."""
    return _stop["signal"]


def append_line(path, line):
    """Append line (and a newline) to a file whole, or not at all: a write cut short (disk full)
    is undone before the error is raised, so a reader never meets a torn last line."""
    data = (line + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
        except OSError:
            written = -1
        if written != len(data):
            os.ftruncate(fd, size)
            raise OSError(f"cannot append to {path} ({'disk full or file too large' if written >= 0 else 'write failed'}: "
                          f"{shutil.disk_usage(os.path.dirname(path) or '.').free / 2**20:,.0f} MiB free)")
    finally:
        os.close(fd)


def check_replaceable(final, owned, what):
    """Raise ValueError unless final is absent, an empty directory, or a directory holding only files
    whose names match the patterns in owned (what the tool that replaces it writes). what names
    that tool's output, for the message."""
    if not os.path.lexists(final):
        return
    if not os.path.isdir(final) or os.path.islink(final):
        raise ValueError(f"{final} exists and is not a directory: choose another output directory")
    foreign = sorted(name for name in os.listdir(final) if not any(fnmatch.fnmatch(name, p) for p in owned))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(f"{final} is not {what} (it holds {shown}): refusing to replace it; choose another "
                         f"output directory, or empty that one")


def replace_directory(tmp, final):
    """Swap a finished directory (a dataset, an export) in for final; an older one there is removed
    only after that. The caller has checked final with check_replaceable before any work."""
    old = final.rstrip("/") + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
