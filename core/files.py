"""Atomic file replacement, shared by checkpoints (core) and results files (bench): readers
see the old file or the new one, never half of one."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _mode_for(path: Path) -> int:
    """An existing file's permissions, else what a plain open() would give under the umask."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        pass
    try:  # Linux reports the umask without changing it
        with open("/proc/self/status", encoding="ascii") as f:
            umask = next(int(ln.split()[1], 8) for ln in f if ln.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = 0o022
    return 0o666 & ~umask


def atomic_write(path: Path | str, write) -> None:
    """Call write(tmp) on a temporary file in the target's folder, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # ".tmp-" marks what a killed writer leaves behind (checkpoint saves sweep those up)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _mode_for(path))  # mkstemp's is 0600
        os.replace(tmp, os.fspath(path))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
