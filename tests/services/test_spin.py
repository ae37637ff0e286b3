"""llama.cpp's threads spin briefly after a forward in every service process: the setting is in the
environment when torch loads libgomp (read once, then), and a value the user set is kept."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.test_layout import ROOT

# Records GOMP_SPINCOUNT at the moment torch is first imported, then imports the entry point's
# module body (its `main()` is guarded, so nothing is served).
PROBE = """
import importlib.abc, os, runpy, sys
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "at_torch" not in os.environ:
            os.environ["at_torch"] = os.environ.get("GOMP_SPINCOUNT", "unset")
        return None
sys.meta_path.insert(0, Watch())
runpy.run_module(sys.argv[1], run_name="probe")
print(os.environ.get("at_torch", "torch not loaded"))
"""


def _spin_at_torch(entry: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", PROBE, entry], cwd=ROOT, env={**clean, **env},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("entry", ["services.verifier.__main__", "services.drafter.__main__"])
def test_the_short_spin_is_set_before_torch_loads(entry):
    assert _spin_at_torch(entry) == "10000"


def test_a_spin_the_user_set_is_kept():
    assert _spin_at_torch("services.verifier.__main__", GOMP_SPINCOUNT="250") == "250"
    assert _spin_at_torch("services.verifier.__main__", OMP_WAIT_POLICY="active") == "unset"
