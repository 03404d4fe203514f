"""One NPU owner per board: several processes submitting to the NPU at once can hang a board, so a process that
opens the device first takes an exclusive lock file in the runtime directory and writes who it is; a second
process gets an error naming the holder (and can run on the CPU with -ngl 0). The kernel drops the lock when the
holder exits, so a crashed server leaves nothing to clean up.

The real runtime (librknnrt) always takes the lock; the emulator takes it when $NPULM_NPU_LOCK=1 (to try the rule
on a machine without a board)."""

from __future__ import annotations

import fcntl
import os
import sys
import tempfile
import time
from pathlib import Path

LOCK_ENV = "NPULM_NPU_LOCK"
RUNTIME_DIR_ENV = "NPULM_RUNTIME_DIR"


class NpuBusy(RuntimeError):
    """Another process owns the NPU."""


def runtime_dir() -> Path:
    """$NPULM_RUNTIME_DIR, else $XDG_RUNTIME_DIR/npulm, else /run/npulm (root), else a per-user temp directory."""
    if os.environ.get(RUNTIME_DIR_ENV):
        d = Path(os.environ[RUNTIME_DIR_ENV])
    elif os.environ.get("XDG_RUNTIME_DIR"):
        d = Path(os.environ["XDG_RUNTIME_DIR"]) / "npulm"
    elif os.geteuid() == 0:
        d = Path("/run/npulm")
    else:
        d = Path(tempfile.gettempdir()) / f"npulm-{os.getuid()}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def wants_lock(runtime_kind: str) -> bool:
    return runtime_kind == "rknn" or os.environ.get(LOCK_ENV, "") not in ("", "0")


class NpuOwner:
    """Holds the lock while the object lives (or until release())."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = -1


def claim(device: str = "rknpu", holder: str | None = None) -> NpuOwner:
    """Take the board's NPU for this process, or raise NpuBusy naming the process that has it."""
    path = runtime_dir() / f"{device}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        who = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise NpuBusy(f"the NPU is in use by {who} (lock {path}); stop that process, or run on the CPU with "
                      "-ngl 0") from None
    holder = holder or " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))[:200]
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} ({holder}) since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    return NpuOwner(path, fd)
