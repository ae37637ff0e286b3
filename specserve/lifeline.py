"""A child process ends when the process that started it goes, however that process ends.

The launcher holds the write end of a pipe and passes the read end to every child it starts, named
by SPECSERVE_LIFELINE_FD. The kernel closes the write end when the launcher exits, SIGKILL
included, and each child reads end-of-file: a service then stops as on SIGTERM (its graceful
drain), and is killed if it is still there after a grace period. Unlike a parent-death signal this
does not depend on which thread of the launcher started the child, and nothing runs between fork
and exec. A program that cannot watch the pipe itself (redis-server) runs under
`python -m specserve.lifeline -- PROGRAM ARGS...`, which does it for it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

ENV = "SPECSERVE_LIFELINE_FD"
GRACE_S = 20.0  # after the launcher goes, how long a child may drain before it is killed

_read_end: int | None = None
_lock = threading.Lock()


def child_fd() -> int:
    """The descriptor to pass (`pass_fds`, named by ENV in the environment) to a child that
    follows this process. One pipe for every child; its write end stays open, unread and
    unwritten, until this process exits."""
    global _read_end
    with _lock:
        if _read_end is None:
            _read_end, _write_end = os.pipe()  # both non-inheritable: only pass_fds hands one on
    return _read_end


def spawn(args: list[str], env: dict[str, str], **popen) -> subprocess.Popen:
    """Start a child that follows this process: the read end passed, and named in its environment."""
    fd = child_fd()
    return subprocess.Popen(args, env={**env, ENV: str(fd)}, pass_fds=(fd,), **popen)


def follow(on_gone=None, on_late=None) -> bool:
    """In a child: when the launcher goes, stop as on SIGTERM (or call `on_gone`), and after
    GRACE_S exit (calling `on_late` first) if still running. Whether there is a lifeline."""
    raw = os.environ.pop(ENV, "")
    if not raw:
        return False
    fd = int(raw)

    def watch() -> None:
        while os.read(fd, 1):
            pass
        (on_gone or (lambda: os.kill(os.getpid(), signal.SIGTERM)))()
        time.sleep(GRACE_S)
        if on_late is not None:
            on_late()
        os._exit(1)

    threading.Thread(target=watch, name="lifeline", daemon=True).start()
    return True


def main(argv: list[str]) -> int:
    """Run a program that cannot follow the lifeline itself: SIGTERM/SIGINT are passed on, the
    program is stopped when the launcher goes, and its exit code is ours."""
    if argv[:1] == ["--"]:
        argv = argv[1:]
    child = subprocess.Popen(argv)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
    follow(on_gone=child.terminate, on_late=child.kill)
    code = child.wait()
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
