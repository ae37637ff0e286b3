"""The built-in model pair, end to end: `specserve up` answers, and greedy output equals the target's own."""

import subprocess
import sys

import pytest

from specserve.models import load_causal_lm, load_tokenizer
from tests.helpers import target_only

pytestmark = pytest.mark.slow


def test_specserve_up_answers_with_target_output(real_pair, tmp_path):
    target_dir, draft_dir = real_pair
    prompt = "def fibonacci(n):"
    out = subprocess.run(
        [sys.executable, "-m", "specserve.cli", "up", "--port", "0", "--metrics-port", "0", "--smoke", prompt],
        capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "FINISH_REASON_LENGTH] 16 tokens" in out.stdout
    tokenizer = load_tokenizer(str(target_dir))
    model = load_causal_lm(str(target_dir))
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    expected = tokenizer.decode(target_only(model, ids, 16), skip_special_tokens=True)
    body = out.stdout.split("'def fibonacci(n):'\n", 1)[1].split("\n\n[FINISH_REASON")[0]
    assert body == expected
