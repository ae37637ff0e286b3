"""The built-in model pair, end to end: `specserve up` answers, and greedy output equals the
target's own greedy output on the same runtime."""

import subprocess
import sys

import pytest

from specserve.tokenizer import load_tokenizer
from specserve.runtime import Row, open_runtime
from tests.helpers import assert_lossless

pytestmark = pytest.mark.slow


def _greedy(model: str, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Plain greedy decoding on the runtime `specserve up` picks for this model, with top-2 gaps."""
    import torch

    runtime = open_runtime(model, max_sessions=1, kv_tokens=1024)
    tokens, gaps, feed = [], [], prompt
    for _ in range(n):
        logits = runtime.forward([Row("ref", feed, [len(feed) - 1])])[0][0]
        top = torch.topk(logits, 2).values
        gaps.append(float(top[0] - top[1]))
        feed = [int(logits.argmax())]
        tokens.append(feed[0])
    return tokens, gaps


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
    expected, gaps = _greedy(str(target_dir), tokenizer.encode(prompt, add_special_tokens=False), 16)
    body = out.stdout.split("'def fibonacci(n):'\n", 1)[1].split("\n\n[FINISH_REASON")[0]
    got = tokenizer.encode(body, add_special_tokens=False)
    if body != tokenizer.decode(expected, skip_special_tokens=True):
        assert_lossless(got, (expected, gaps))
