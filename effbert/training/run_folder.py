"""The run folder (``--out``) of ``effbert pretrain`` and ``effbert finetune``: one run at a time, nothing lost.

- One run per folder: a run holds an exclusive ``fcntl.flock`` on ``DIR/.effbert.lock`` (its pid written inside) from
  before its first write to its end; the OS drops it when the process dies, however it dies. A second run on the
  folder stops at once, writing nothing, and names the holder's pid. (POSIX only: no Windows.)
- Only its own files: a command refuses a folder that holds names it does not write.
- Complete checkpoints: Trainer writes ``trainer_state.json`` last, so a ``checkpoint-N`` that lacks it (or any other
  file of a save, or has an empty one) is a save cut short; a resume skips it, says so, and leaves it in place.
- Data fingerprints: size plus SHA-256 of the first and last MiB of each data file, so a resume on other data is
  refused. It misses an edit of the same size in the middle of a file over 2 MiB: it is a check, not a proof.
- A stop is one line: ctrl-C (and SIGTERM) names the step and the checkpoint to resume from, exit 130 (143); a full
  disk during a save names the save and the intact checkpoint, exit 2.
"""

import errno
import fcntl
import fnmatch
import hashlib
import json
import os
import signal
import sys

# Trainer's checkpoint folders: what makes one complete (one copy of the rule, beside the loaders),
# imported by the commands and the tests from here, where the run folder uses them
from ..models.loading import (  # noqa: F401
    CHECKPOINT_FILES,
    MODEL_FILES,
    checkpoints,
    missing_files,
    newest_complete,
)


LOCK_FILE = ".effbert.lock"
_MIB = 1 << 20


class UsageError(Exception):
    """A mistake in a command line or in the files it names: reported in one line, exit code 2."""

    code = 2


class Stopped(UsageError):
    """A run stopped from outside (ctrl-C, SIGTERM): one line, and the shell's exit code for the signal."""

    def __init__(self, msg, code):
        super().__init__(msg)
        self.code = code


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, so that it stops the run as ctrl-C does."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def atomic_write(text, path):
    """Write ``text`` to ``path`` through a temporary file: a crash mid-write leaves the previous file whole."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def fingerprint(path):
    """``{"file", "size", "sha256_ends"}``: the size and the SHA-256 of the first and last MiB (the whole file when
    it is at most 2 MiB) of a data file, cheap for any size."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        h.update(f.read(_MIB))
        if size > _MIB:
            f.seek(max(_MIB, size - _MIB))
            h.update(f.read(_MIB))
    return {"file": os.path.abspath(path), "size": size, "sha256_ends": h.hexdigest()}


def check_same_data(flag, recorded, paths, out):
    """Refuse ``paths`` when they are not the files the run in ``out`` recorded (``recorded``: a list of
    ``fingerprint``s, None for a run file of an older version, which recorded none): which flag, which file, what
    changed. A file moved or renamed with the same contents is the same data."""
    if recorded is None:
        return
    if len(recorded) != len(paths):
        raise UsageError(
            f"{flag}: the run in {out!r} was trained on {len(recorded)} file(s) "
            f"({', '.join(os.path.basename(r['file']) for r in recorded)}), given {len(paths)}"
        )
    for was, path in zip(recorded, paths):
        now = fingerprint(path)
        if now["size"] != was["size"]:
            raise UsageError(
                f"{flag}: {path!r} is not the data the run in {out!r} was trained on ({was['file']!r}): "
                f"{was['size']} bytes then, {now['size']} now"
            )
        if now["sha256_ends"] != was["sha256_ends"]:
            raise UsageError(
                f"{flag}: {path!r} is not the data the run in {out!r} was trained on ({was['file']!r}): "
                "the same size, other contents"
            )


class RunFolder:
    """``--out`` of one run: its lock, its own files, its checkpoints, and the line a stop ends with.

    ``own``: ``fnmatch`` patterns of the names the command writes at the folder's top; ``checkpoint_root``: where
    Trainer keeps its ``checkpoint-N`` folders (the command may move it, e.g. per stage)."""

    def __init__(self, path, command, own, checkpoint_root=None, flag="--out"):
        self.path, self.command, self.flag = os.fspath(path), command, flag
        self.own = tuple(own) + (LOCK_FILE, "*.tmp")
        self.checkpoint_root = checkpoint_root or self.path
        self.trainer = None  # set by the command when training starts: the step a stop names
        self.step = 0
        self._fd = self._made = self._sigterm = None

    # -------------------------------------------------------------------------------------------- the lock

    def lock(self):
        """Take the folder (made when missing) for this process, before any other write; a second run gets a
        ``UsageError`` naming the holder's pid and writes nothing."""
        self._made = not os.path.isdir(self.path)
        os.makedirs(self.path, exist_ok=True)
        path = os.path.join(self.path, LOCK_FILE)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise UsageError(
                    f"{self.flag}: {self.path!r} is in use by another effbert run (pid {holder}); wait "
                    "for it to end or choose another folder"
                ) from None
            try:  # the run before removed the file after we opened it: lock the one now there
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        try:  # SIGTERM stops the run as ctrl-C does (one line, the checkpoint to resume from)
            self._sigterm = signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:  # not the main thread: leave signals alone
            self._sigterm = None
        return self

    def release(self):
        """Drop the lock and its file (the next run checks it locks the file that is there); a folder this run
        made and left empty goes too, so a refused run leaves nothing. A run that dies leaves the file, unlocked."""
        if self._fd is None:
            return
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)
        try:
            os.remove(os.path.join(self.path, LOCK_FILE))
            if self._made and not os.listdir(self.path):
                os.rmdir(self.path)
        except OSError:
            pass
        os.close(self._fd)  # closing the last descriptor drops the flock
        self._fd = None

    # --------------------------------------------------------------------------------------- the contents

    def foreign(self):
        """The names at the folder's top that the command does not write, sorted."""
        try:
            names = os.listdir(self.path)
        except OSError:
            return []
        return sorted(n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in self.own))

    def refuse_foreign(self):
        foreign = self.foreign()
        if foreign:
            shown = ", ".join(foreign[:5]) + (
                f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
            )
            raise UsageError(
                f"{self.flag}: {self.path!r} holds files {self.command} did not write ({shown}); "
                f"{self.flag} must be a new or empty folder, or a run of {self.command}"
            )

    def is_empty(self):
        try:
            return not [n for n in os.listdir(self.path) if n != LOCK_FILE]
        except OSError:
            return True

    # -------------------------------------------------------------------------------------------- stopping

    def intact(self, root=None):
        ckpt = newest_complete(root or self.checkpoint_root)
        return f"{os.path.basename(ckpt)} is intact" if ckpt else "no checkpoint yet"

    def stopped(self, exc):
        """The one line (a ``Stopped``) for a ``KeyboardInterrupt`` (ctrl-C, or SIGTERM)."""
        step = self.trainer.state.global_step if self.trainer is not None else self.step
        code = 143 if isinstance(exc, _Terminated) else 130
        return Stopped(f"interrupted at step {step}; {self.intact()}; resume with --resume", code)

    def train(self, trainer, resume):
        """``trainer.train(resume_from_checkpoint=resume)``; a full disk during a save is one line."""
        self.trainer = trainer
        try:
            return trainer.train(resume_from_checkpoint=resume)
        except (
            Exception
        ) as exc:  # torch.save's full disk is a RuntimeError without errno, safetensors' its own
            if not self._no_space(exc):
                raise
            raise UsageError(
                f"no space left on device while saving checkpoint-{trainer.state.global_step}; "
                f"{self.intact()}"
            ) from None

    def _no_space(self, exc):
        if getattr(exc, "errno", None) == errno.ENOSPC or "No space left on device" in str(exc):
            return True
        if isinstance(exc, UsageError):
            return False
        try:  # torch.save's writer says only "unexpected pos": a folder with (nearly) no space left is the cause
            st = os.statvfs(self.checkpoint_root)
            return st.f_bavail * st.f_frsize < _MIB
        except OSError:
            return False


# ------------------------------------------------------------------------------- the learning-rate schedule


def with_schedule(cls, steps=None):
    """``cls`` (a Trainer) whose linear schedule ends at ``steps`` (None: at its ``max_steps``), whatever its
    ``max_steps``, so that a longer resume keeps the run's schedule; the scheduler's state (its step) comes from the
    checkpoint."""

    class Scheduled(cls):
        def create_scheduler(self, num_training_steps, optimizer=None):
            return super().create_scheduler(steps or num_training_steps, optimizer)

        def _load_optimizer_and_scheduler(self, checkpoint):
            super()._load_optimizer_and_scheduler(checkpoint)
            if checkpoint is None:
                return
            # the optimizer's saved lr is the old schedule's until the scheduler's next step: the first step after
            # a --reshape-schedule would train at it, so the lr is set from this schedule at once
            sched = self.lr_scheduler
            lrs = [
                base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)
            ]
            for group, lr in zip(self.optimizer.param_groups, lrs):
                group["lr"] = lr
            sched._last_lr = lrs

    return Scheduled


def schedule_line(kept, steps, reshape, warmup=None):
    """The one line a resume prints about its schedule: kept (ending at step ``kept``) or reshaped to ``steps``."""
    if reshape:
        return f"reshaping the learning-rate schedule (--reshape-schedule): linear decay to 0 at step {steps}, was {kept}"
    return (
        "keeping the run's learning-rate schedule: "
        + (f"warm-up {warmup} steps, " if warmup is not None else "")
        + f"linear decay to 0 at step {kept}"
        + (
            f" (the steps after it train at lr 0; --reshape-schedule "
            f"stretches it to --max-steps {steps})"
            if steps > kept
            else ""
        )
    )


def checkpoint_max_steps(ckpt):
    """The ``max_steps`` of the run that wrote ``ckpt`` (Trainer's state records it), or None."""
    try:
        with open(os.path.join(ckpt, "trainer_state.json"), encoding="utf-8") as f:
            return int(json.load(f)["max_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def one_line(exc, limit=400):
    """An exception as one line of at most ``limit`` characters: its message's first line (its
    type's name when it has no message)."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def fail_if(condition, message):
    """Raise ``UsageError(message)`` when ``condition`` holds: validation reads as one line a
    rule."""
    if condition:
        raise UsageError(message)


def default_backend(device):
    """The effbert op backend a run uses when ``--backend`` is not given: ``auto``, but ``eager`` on
    a CPU under the Triton interpreter (``TRITON_INTERPRET=1``), a correctness tool far too slow to
    train with."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "eager"
    return "auto"


def is_main_process():
    """Whether this is the process that speaks and writes: the first under torchrun (which sets
    ``RANK``)."""
    return int(os.environ.get("RANK", "0")) == 0


# -------------------------------------------------------------------------------- file permissions


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_readable(path):
    """Give every file at ``path`` (a file, or a folder walked whole) the mode a plain ``open``
    would (``0o666`` less the umask: 0644 under the usual 022). safetensors' ``save_file`` writes
    through a private temporary file, mode 0600, which ``save_pretrained`` and Trainer's checkpoints
    inherit; every other file a run writes is 0644.
    Returns the paths changed. Raises ``FileNotFoundError`` when ``path`` does not exist."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"path: {path!r} does not exist")
    mode = 0o666 & ~_umask()
    files = (
        [path]
        if not os.path.isdir(path)
        else [os.path.join(root, n) for root, _, names in os.walk(path) for n in names]
    )
    changed = []
    for f in files:
        if not os.path.islink(f) and (os.stat(f).st_mode & 0o777) != mode:
            os.chmod(f, mode)
            changed.append(f)
    return changed


def stderr_is_terminal():
    """Whether a progress bar belongs on stderr (a person watching, not a log file or a pipe)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        return False


def parse_device(arg, flag="--device"):
    """``--device``: ``cpu``, ``cuda`` or ``cuda:N`` (None: cuda when available), checked against this machine."""
    import torch

    if arg is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(arg)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"{flag} must be cpu, cuda or cuda:N, got {arg!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                "this torch is a CPU-only build"
                if torch.version.cuda is None
                else "torch sees no CUDA device"
            )
            raise UsageError(f"{flag} {arg}: no CUDA device is available ({why})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(
                f"{flag} {arg}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return device
