"""
The run directory, and the files around it that must never be lost or half-written:
    lock_run_directory     one run per out_dir (flock on out_dir/.lock, released on every exit; where a
                           run starts within it: resume.py)
    open_run_log           out_dir/config.py, metrics.jsonl (lines appended whole or not at all), wandb;
                           log_line, the console's line of the same metrics
    catch_stop_signals     SIGTERM / SIGUSR1 / Ctrl-C / SIGHUP recorded, so train.py stops with a checkpoint
    log, fail, end_run     rank 0's console; how a run ends: one line and exit 1, or its last checkpoint and exit 0;
                           fail_on, a block whose errors of a kind end it that way
    claim_output           a dataset's or an export's directory taken by one writer (flock on its .lock),
                           its .tmp and .old leftovers deleted only when that tool's mark says they are its own
    replace_directory      a finished dataset or export swapped in for an older one, and only over a
                           directory that holds nothing but what the same tool writes
    check_replaceable_file a tool's output file (task, scores, GPU check) written only over one it wrote itself
"""
import atexit
from contextlib import contextmanager
import ctypes
from datetime import timedelta
import fcntl
import fnmatch
import json
import os
import shutil
import signal
import sys
import time

_lock_file = None  # held open (and locked) for the whole run


def _lock(path):
    """(the open file, the PID it held before) with an exclusive lock on path and this PID written in
    it, or (None, the PID of the process that holds it). The kernel drops the lock when the process
    ends however it ends, so a lock left by a killed process is simply taken over."""
    lock_file = open(path, "a+")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        holder = lock_file.read().strip() or "unknown"
        lock_file.close()
        return None, holder
    lock_file.seek(0)
    previous = lock_file.read().strip()
    lock_file.truncate(0)
    lock_file.write(f"{os.getpid()}\n")
    lock_file.flush()
    return lock_file, previous


class Refused(Exception):
    """A start that would lose or misuse a run: train.py prints the message and exits 1."""


def lock_run_directory(out_dir):
    """Take out_dir for this process: an exclusive lock on out_dir/.lock (_lock); every exit through
    Python empties it too (no PID left behind). Refuses, naming the PID of a run that holds it, or
    saying why out_dir cannot be used (Refused)."""
    global _lock_file
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock_file, previous = _lock(os.path.join(out_dir, ".lock"))
    except OSError as e:
        raise Refused(
            f"cannot use {out_dir} as the run directory ({e.strerror}): choose a writable --out_dir"
        ) from None
    if lock_file is None:
        raise Refused(f"{out_dir} is in use by another run (PID {previous}): wait for it to end, or choose "
                      f"another --out_dir")
    if previous:
        print(f"{out_dir}: taking over the lock of an earlier run (PID {previous}) that ended without releasing it",
              flush=True)
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
    """From now on SIGTERM / SIGUSR1 (what SLURM and cloud schedulers send before they kill), Ctrl-C
    and SIGHUP (a closed terminal; under torchrun, the launcher's death) are only recorded, for
    stop_signal(): train.py then finishes its step, checkpoints and exits. A second signal exits at
    once (a checkpoint being written stays a *.tmp)."""
    def on_signal(signum, frame):
        if _stop["signal"] is not None:
            if signum == signal.SIGHUP:  # the launcher's death, told once more: already stopping
                return
            os._exit(128 + signum)
        _stop["signal"] = signum
        what = "its launcher died" if signum == signal.SIGHUP else f"got {signal.Signals(signum).name}"
        print(f"rank {rank}: {what}; stopping after this step with a checkpoint (a second signal stops at once)",
              file=sys.stderr, flush=True)
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    if "TORCHELASTIC_RUN_ID" in os.environ and sys.platform == "linux":
        # a launcher killed outright (SIGKILL: it cannot pass the signal on) sends its ranks a SIGHUP, so they
        # stop together with a checkpoint instead of running on, orphaned, holding their devices
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGHUP)  # PR_SET_PDEATHSIG


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
            raise OSError(
                f"cannot append to {path} ({'disk full or file too large' if written >= 0 else 'write failed'}: "
                f"{shutil.disk_usage(os.path.dirname(path) or '.').free / 2**20:,.0f} MiB free)"
            )
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
    foreign = sorted(name for name in os.listdir(final)
                     if not any(fnmatch.fnmatch(name, p) for p in (*owned, OWNER, ".lock")))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(f"{final} is not {what} (it holds {shown}): refusing to replace it; choose another "
                         f"output directory, or empty that one")


def check_replaceable_file(path, ours, what, option):
    """Raise ValueError unless path is absent or a file whose first JSON value (the first line of a
    .jsonl, the whole of another file) ours(value) says the tool wrote: a mistyped output path never
    replaces a run's metrics.jsonl or a checkpoint's meta.json. what names the tool's output, option
    the setting to change, for the message."""
    if not os.path.lexists(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "") if path.endswith(".jsonl") else f.read()
        mine = ours(json.loads(first))
    except (OSError, ValueError):  # a directory, unreadable, not JSON
        mine = False
    if not mine:
        raise ValueError(f"{path} exists and is not {what}: refusing to replace it; choose another --{option}")


OWNER = ".owner"  # in a tool's final.tmp and final.old while it works: the tool's name (never in final itself)
_claims = {}  # the output locks this process holds, by path: open until it ends


def claim_output(final, *, tool, option):
    """Take final for this process before writing it (prepare.py's datasets, export_hf.py's exports):
    an exclusive lock on final/.lock for the process's life, so a second writer is refused
    (naming the first's PID) instead of mixing two outputs; then final.tmp and final.old, an earlier
    run's leftovers, deleted only if their OWNER file names tool (anything else there is someone's,
    and refused). Returns final.tmp, created empty and marked as tool's."""
    final = final.rstrip("/")
    lock_path = os.path.join(final, ".lock")  # inside final: what replaces final (final.tmp) never has one
    if lock_path not in _claims:  # (a process that writes final twice holds it once)
        try:
            if not os.path.isdir(final):  # made here: removed again at exit if nothing was written in it
                os.makedirs(final)
                atexit.register(_remove_if_unused, final)
            lock, holder = _lock(lock_path)
        except OSError as e:
            raise ValueError(f"cannot write {final} ({e.strerror}): choose another --{option}") from None
        if lock is None:
            raise ValueError(f"{final} is being written by another process (PID {holder}): wait for it to end, "
                             f"or choose another --{option}")
        _claims[lock_path] = lock
    for leftover in (final + ".tmp", final + ".old"):
        if not os.path.lexists(leftover):
            continue
        try:
            with open(os.path.join(leftover, OWNER)) as f:
                mine = f.read().strip() == tool and not os.path.islink(leftover)
        except OSError:
            mine = False
        if not mine:
            raise ValueError(f"{leftover} exists and was not left by {tool} (no {OWNER} file naming it): refusing "
                             f"to delete it; move it away, or choose another --{option}")
        shutil.rmtree(leftover)
    os.makedirs(final + ".tmp")
    with open(os.path.join(final + ".tmp", OWNER), "w") as f:
        f.write(tool + "\n")
    return final + ".tmp"


def _remove_if_unused(final):
    """final, made by claim_output, removed when it holds nothing but its lock (the tool failed first)."""
    try:
        if os.listdir(final) == [".lock"]:
            os.remove(os.path.join(final, ".lock"))
            os.rmdir(final)
    except OSError:
        pass


def replace_directory(tmp, final):
    """Swap a finished directory (a dataset, an export) in for final; an older one there is removed
    only after that. The caller has checked final with check_replaceable and made tmp with
    claim_output (which cleared final.old) before any work."""
    old = final.rstrip("/") + ".old"
    with open(os.path.join(tmp, OWNER)) as f:
        tool = f.read()
    os.remove(os.path.join(tmp, OWNER))  # what a user copies or renames as a backup never carries the mark
    if os.path.exists(final):
        with open(os.path.join(final, OWNER), "w") as f:  # final.old, should this stop before it is removed
            f.write(tool)
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def log_line(metrics, *, max_iters, elapsed_s, eta_s):
    """The console line of a log step's metrics (train.py's record), with the elapsed time and the ETA."""
    m = metrics
    return (
        f"step {m['step']}/{max_iters} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | grad norm {m['grad_norm']:.3f} | "
        f"{m['tokens_per_s']:,.0f} tok/s | {m['ms_per_step']:.1f} ms/step"
        + (f" | MFU {100 * m['mfu']:.1f}%" if "mfu" in m else "")
        + f" | {m['peak_memory_mb']:,.0f} MB"
        + (f" | {m['skipped_steps']} skipped steps" if m["skipped_steps"] else "")
        + f" | {timedelta(seconds=round(elapsed_s))} elapsed, ETA {timedelta(seconds=round(eta_s))}"
    )


def open_run_log(out_dir, config, run, *, master, wandb_project="", wandb_run_name=""):
    """On rank 0: out_dir/config.py (the full config, which runs again as python train.py
    out_dir/config.py), metrics.jsonl's first record ({"config", "run"}) and wandb. Returns
    record(metrics), a no-op on the other ranks: a metrics.jsonl line with the wall-clock time,
    written whole or not at all, and the same to wandb. A full disk stops the run (fail)."""
    if not master:
        return lambda metrics: None
    wandb = None
    if wandb_project:
        import wandb
        wandb.init(project=wandb_project, name=wandb_run_name or None, config=config)

    def record(metrics):
        with fail_on(OSError):
            append_line(os.path.join(out_dir, "metrics.jsonl"), json.dumps({**metrics, "time": round(time.time(), 3)}))
        if wandb is not None and "step" in metrics:
            wandb.log(metrics, step=metrics["step"])
    record({"config": config, "run": run})
    with open(os.path.join(out_dir, "config.py"), "w") as f:
        f.write("".join(f"{k} = {v!r}\n" for k, v in config.items()))
    return record


# ---- how a run speaks and ends -----------------------------------------------------------------
def log(*args):
    """Print on rank 0 only (torchrun's RANK): the other ranks' lines would repeat it."""
    if os.environ.get("RANK", "0") == "0":
        print(*args, flush=True)


def fail(message):
    """One line on stderr naming the rank, and exit 1 (the lock is released on the way out)."""
    print(f"error (rank {os.environ.get('RANK', '0')}): {message}", file=sys.stderr, flush=True)
    if dist := _process_group():
        dist.destroy_process_group()
    sys.exit(1)


def _process_group():
    """torch.distributed when this process has joined a process group, else None (without importing
    torch: the tools that use this file never need it)."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


@contextmanager
def fail_on(*errors, prefix=""):
    """A block whose errors of these types are bad input (a config, a file, a checkpoint): the run
    ends with the error's one line (fail), prefix first."""
    try:
        yield
    except errors as e:
        fail(f"{prefix}{e}")


def end_run():
    """The end, once the last checkpoint is written: the lock released, every rank leaving together, exit 0."""
    release_run_directory()
    if dist := _process_group():
        dist.barrier()  # a rank that tears down while another still works can abort the group
        dist.destroy_process_group()
    # Without Python's exit: gloo's C++ teardown at interpreter exit can abort a process (SIGABRT,
    # "terminate called without an active exception") once all the work is done.
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)
