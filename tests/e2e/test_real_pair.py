"""The built-in model pair, end to end: `specserve up` answers, and greedy output equals the
target's own greedy output on the same runtime."""

import subprocess
import sys

import pytest

from specserve.runtime import open_runtime
from specserve.tokenizer import load_tokenizer
from tests.helpers import QUANTIZED_NEAR_TIE, assert_lossless, greedy_reference

pytestmark = pytest.mark.slow


def test_specserve_up_answers_with_target_output(real_pair, tmp_path):
    target_dir, draft_dir = real_pair
    prompt = "def fibonacci(n):"
    out = subprocess.run(
        [sys.executable, "-m", "specserve.cli", "up", "--port", "0", "--metrics-port", "0", "--http-port", "0", "--smoke", prompt],
        capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "FINISH_REASON_LENGTH] 16 tokens" in out.stdout
    assert "runtime llama.cpp" in out.stdout  # the built-in pair is served by llama.cpp off CUDA
    tokenizer = load_tokenizer(str(target_dir))
    # Plain greedy decoding on the runtime `specserve up` picks for this model.
    runtime = open_runtime(str(target_dir), max_sessions=1, kv_tokens=1024)
    expected, gaps = greedy_reference(runtime, tokenizer.encode(prompt, add_special_tokens=False), 16)
    body = out.stdout.split("'def fibonacci(n):'\n", 1)[1].split("\n\n[FINISH_REASON")[0]
    got = tokenizer.encode(body, add_special_tokens=False)
    if body != tokenizer.decode(expected, skip_special_tokens=True):
        assert_lossless(got, (expected, gaps), QUANTIZED_NEAR_TIE)
