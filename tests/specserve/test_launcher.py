"""The launcher's process handling, with small stand-in programs rather than the services: children
end with the launcher whichever thread started them, log handles do not pile up, a service's own
bound port is read back, and the supervisor restarts what dies or hangs without giving up on an
optional service."""

import os
import signal
import subprocess
import sys
import time

from specserve.launcher import HUGE_PAGES, MAX_RESTARTS, Service, Stack, free_port, huge_pages

PY = sys.executable


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _children(pid: int) -> list[int]:
    out = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
        except OSError:
            pass
    return out


LAUNCHER = """
import sys, threading
from pathlib import Path
from specserve.launcher import Service
spec = Service("sleeper", [sys.executable, "-m", "specserve.lifeline", "--", "sleep", "600"], {})
starter = threading.Thread(target=spec.start, args=(Path(sys.argv[1]),))
starter.start()
starter.join()  # the thread that started the child is gone
print(spec.proc.pid, flush=True)
sys.stdin.read()
"""


def test_a_child_outlives_the_thread_that_started_it_and_ends_with_its_launcher(tmp_path):
    launcher = subprocess.Popen([PY, "-c", LAUNCHER, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
    try:
        child = int(launcher.stdout.readline())
        _wait(lambda: _children(child), 10, "the wrapped program to start")
        grandchild = _children(child)[0]
        assert _alive(child) and _alive(grandchild)  # a parent-death signal tied to the thread killed it here
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        _wait(lambda: not _alive(child) and not _alive(grandchild), 30, "the child to follow its launcher")
    finally:
        launcher.kill()


def test_restarts_leave_no_log_handle_open(tmp_path):
    spec = Service("quick", [PY, "-c", "pass"], {})
    spec.start(tmp_path)  # the first start opens the lifeline pipe, held for good
    spec.proc.wait()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        spec.start(tmp_path)
        spec.proc.wait()
    assert len(os.listdir("/proc/self/fd")) == before


def test_the_port_a_service_bound_is_read_from_its_own_log(tmp_path):
    spec = Service("binder", [PY, "-c", "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); "
                                        "print('binder listening on 127.0.0.1:%d' % s.getsockname()[1], flush=True); "
                                        "import time; time.sleep(60)"], {})
    try:
        spec.start(tmp_path)
        port = spec.ports(1, timeout_s=20)[0]
        assert port > 0 and str(port) in spec.log_path.read_text()
        spec.stop()
        spec.start(tmp_path)  # the log is appended to: the second start's port is its own line
        assert spec.ports(1, timeout_s=20)[0] != 0 and spec.log_path.read_text().count("listening on") == 2
    finally:
        spec.kill()


def _stack(tmp_path, services: dict[str, list[str]], address: str = "") -> Stack:
    stack = Stack("", "", log_dir=tmp_path)
    for name, args in services.items():
        spec = Service(name, args, {}, address if name == "gateway" else "")
        spec.start(tmp_path)
        stack.services[name] = spec
    return stack


def test_a_flapping_optional_service_never_ends_the_supervisor_but_a_required_one_does(tmp_path):
    crash, idle = [PY, "-c", "raise SystemExit(3)"], [PY, "-c", "import time; time.sleep(120)"]
    stack = _stack(tmp_path, {"policy": crash, "gateway": idle})
    events: list[str] = []
    try:
        stack.supervise(on_event=events.append, poll_s=0.02, backoff_s=(0.01,))
        _wait(lambda: sum("policy exited" in e for e in events) > MAX_RESTARTS + 2, 30, "the policy to flap")
        assert not stack.failed and stack.services["gateway"].proc.poll() is None
    finally:
        stack.stop()
    stack = _stack(tmp_path, {"gateway": crash})
    try:
        stack.supervise(on_event=events.append, poll_s=0.02, backoff_s=(0.01,))
        _wait(lambda: stack.failed, 30, "the supervisor to give up on the gateway")
        assert "gateway died" in stack.failed
    finally:
        stack.stop()


def test_a_service_whose_health_never_answers_is_killed_and_restarted(tmp_path):
    hung = [PY, "-c", "import time; time.sleep(120)"]  # alive, but no health service on its address
    stack = _stack(tmp_path, {"gateway": hung}, address=f"127.0.0.1:{free_port()}")
    first = stack.services["gateway"].proc
    events: list[str] = []
    try:
        stack.supervise(on_event=events.append, poll_s=0.05, liveness_timeout_s=1.0, backoff_s=(0.01,))
        _wait(lambda: stack.services["gateway"].proc is not first, 30, "a restart")
        assert first.returncode == -signal.SIGKILL and any("answered no health check" in e for e in events)
    finally:
        stack.stop()


def test_no_service_is_left_running_when_the_stack_stops_during_restarts(tmp_path):
    short = [PY, "-c", "import time; time.sleep(0.05)"]
    stack = _stack(tmp_path, {"policy": short, "drafter": short})
    events: list[str] = []
    stack.supervise(on_event=events.append, poll_s=0.01, backoff_s=(0.0,))
    _wait(lambda: len(events) >= 6, 30, "a few restarts")
    stack.stop()
    stack.supervisor.join(10)
    assert not stack.supervisor.is_alive()
    assert all(spec.proc.poll() is not None for spec in stack.services.values())


def test_a_tunable_the_user_sets_wins(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert huge_pages() == HUGE_PAGES
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert huge_pages() == {}
