"""One training per run directory: ``OUT/.lock`` names the process that trains into it.

Two trainings writing one directory would replace each other's checkpoints and interleave their
metrics. The lock is a file created with O_CREAT | O_EXCL (atomic, also on network filesystems)
holding its owner's pid and host. A process killed with SIGKILL cannot remove it; the next
training finds its pid dead and takes it over, under an flock of the directory so that of several
processes taking over one stale lock exactly one succeeds. A lock from another host cannot be
checked from here, so it is refused with the way to clear it.

Under torchrun only rank 0 takes the lock, before the process group exists: the ranks of one job
share the directory and only rank 0 writes into it, and a refused rank 0 then exits before any
rank waits for it in a collective (torchrun stops the others, still in the rendezvous).
"""

import contextlib
import fcntl
import os
import socket
from pathlib import Path

from ..checkpoint import pid_alive

LOCK = ".lock"


class InUseError(ValueError):
    """The run directory is taken (a ValueError as any bad argument: the CLI reports it in one line, exit code 2)."""


@contextlib.contextmanager
def hold(out_dir: Path):
    """Hold ``out_dir``'s lock for the body, released on every way out of it (return, error, Ctrl-C)."""
    path = acquire(out_dir)
    try:
        yield path
    finally:
        release(path)


def acquire(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK
    me = _owner_line()
    for _ in range(3):  # a lock released or taken over between our attempts: look again, a few times
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            text = _read(path)
            if text is None:
                continue  # released meanwhile
            owner = _parse(text)
            if owner is None:  # empty: its owner is between creating and writing it (microseconds), or was killed there
                raise InUseError(
                    f"{out_dir} is locked by {path}, which names no process; if no training runs there, delete it"
                ) from None
            pid, host = owner
            if host != socket.gethostname():
                raise InUseError(
                    f"{out_dir} is in use by a training on host {host} (pid {pid}); "
                    "wait for it or choose another --out "
                    f"(if no training runs there, delete {path})"
                ) from None
            if pid_alive(pid) and pid != os.getpid():
                raise InUseError(
                    f"{out_dir} is in use by a running training (pid {pid}); wait for it or choose another --out"
                ) from None
            # Its owner died without releasing it (SIGKILL, power loss), or is this very process after a
            # pid reuse (pid 1 in a container): stale, take it over.
            if _take_over(out_dir, path, text, me):
                return path
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return path
    raise InUseError(
        f"{out_dir} is in use: its lock {path} keeps changing hands; "
        "wait for the other training or choose another --out"
    )


def _take_over(out_dir: Path, path: Path, stale: str, me: str) -> bool:
    """Replace the stale lock ``stale`` by ours, atomically: of several processes taking over one stale lock, one wins.

    "Unchanged since read, then replace" is a compare-and-swap, which files alone do not offer:
    two processes can both see the stale text, and the second's removal would then remove the
    first's new lock. So takeovers are serialised by an flock on the run directory (released by
    the kernel if its holder dies, so it never goes stale itself); creating a lock where there is
    none stays the O_EXCL create above.
    """
    dir_fd = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        if _read(path) != stale:  # another process took it over (or it was released) while we waited
            return False
        tmp = path.with_name(f"{LOCK}.{os.getpid()}.tmp")
        tmp.write_text(me)
        os.replace(tmp, path)  # never a moment without a lock: the stale one is replaced by ours whole
        return True
    finally:
        os.close(dir_fd)  # (releases the flock)


def release(path: Path) -> None:
    """Remove the lock if it is still ours (never a lock another process took over)."""
    if _read(path) == _owner_line():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _owner_line() -> str:
    return f"{os.getpid()} {socket.gethostname()}\n"


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _parse(text: str) -> tuple[int, str] | None:
    parts = text.split()
    if len(parts) != 2 or not parts[0].isdigit():
        return None
    return int(parts[0]), parts[1]
