"""Fold claims: a ``claim`` file holding the pid of the process training a fold, so processes sharing ``out/``
split the folds; a dead holder's claim is taken over."""

from __future__ import annotations

import os
from pathlib import Path

CLAIM = "claim"  # a fold being trained: holds the training process's pid


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claimed_by_other(fold_dir: Path) -> bool:
    """Whether another live process holds the fold's claim (an unreadable or empty claim file holds nothing)."""
    try:
        pid = int((fold_dir / CLAIM).read_text().strip() or 0)
    except (OSError, ValueError):
        return False
    return pid != os.getpid() and pid > 0 and pid_alive(pid)


def claim(fold_dir: Path) -> bool:
    """Claim a fold for this process (False when a live process holds it; a dead holder's claim is taken over)."""
    fold_dir.mkdir(parents=True, exist_ok=True)
    path = fold_dir / CLAIM
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if claimed_by_other(fold_dir):
                return False
            path.unlink(missing_ok=True)  # left by a process that died
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def release(fold_dir: Path) -> None:
    """Remove the fold's claim (done training, or failed)."""
    (fold_dir / CLAIM).unlink(missing_ok=True)
