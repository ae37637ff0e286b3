"""Automatic prefix caching in both runtimes: a released session's KV serves a new session that
starts with the same tokens, the output is what a fresh computation gives, and the cache gives way
when its room is needed."""

import numpy as np
import torch

from specserve.runtime import Row
from specserve.runtime.prefix import MIN_REUSE, PrefixIndex, common_prefix
from tests.helpers import greedy_reference

SYSTEM = [(5 * i) % 300 + 7 for i in range(40)]  # a shared "system prompt"


def test_common_prefix_and_the_longest_match():
    assert common_prefix(np.array([1, 2, 3]), np.array([1, 2, 4])) == 2
    assert common_prefix(np.array([1, 2]), np.array([1, 2, 3])) == 2
    assert common_prefix(np.array([], dtype=np.int64), np.array([1])) == 0
    index = PrefixIndex()
    index.tokens("a").extend(SYSTEM)
    index.tokens("b").extend(SYSTEM[:10])
    cache = index.retire("a")
    assert index.longest("new", SYSTEM + [1, 2], limit=len(SYSTEM) + 1) == (cache, len(SYSTEM))
    assert index.longest("new", SYSTEM, limit=20) == (cache, 20)  # never past the first kept logits
    assert index.longest("new", SYSTEM, limit=MIN_REUSE - 1) == (None, 0)
    assert index.longest("new", [999, *SYSTEM], limit=30) == (None, 0)


def test_a_new_session_reuses_a_released_prefix_and_computes_the_same_logits(tiny_pair):
    cached, fresh = tiny_pair.runtimes()[0], tiny_pair.runtimes()[0]
    first = SYSTEM + [11, 12, 13]
    cached.forward([Row("a", first, [len(first) - 1])])
    cached.release("a")
    assert cached.kv_tokens == 0 and cached.cached_tokens == len(first)
    second = SYSTEM + [21, 22, 23, 24]
    row = Row("b", second, [len(second) - 1])
    (hit,) = cached.forward([row])
    (miss,) = fresh.forward([Row("b", second, [len(second) - 1])])
    assert row.reused == len(SYSTEM)
    assert cached.length("b") == len(second)
    torch.testing.assert_close(hit, miss, atol=1e-3, rtol=1e-3)
    assert int(hit.argmax()) == int(miss.argmax())


def test_decoding_after_a_prefix_hit_is_target_only_decoding(tiny_pair):
    """Lossless: greedy decoding of a session whose prompt came half from the cache equals plain
    decoding from scratch, on both runtimes."""
    runtime = tiny_pair.runtimes()[0]
    runtime.forward([Row("warm", SYSTEM + [9, 9, 9], [0])])
    runtime.release("warm")
    prompt = SYSTEM + [30, 31, 32]
    expected, _ = greedy_reference(tiny_pair.runtimes()[0], prompt, 12)
    got, _ = greedy_reference(runtime, prompt, 12)  # its first forward hits the cache
    assert got == expected


def test_argmax_rows_return_ids_without_logits(tiny_pair):
    runtime = tiny_pair.runtimes()[0]
    logits, ids = runtime.forward([Row("l", SYSTEM, [38, 39]), Row("i", SYSTEM[:20] + [1] * 20, [38, 39], argmax=True)])
    assert logits.shape == (2, runtime.vocab_size) and logits.dtype == torch.float32
    assert ids.shape == (2,) and ids.dtype == torch.int64


def test_a_prompt_read_in_chunks_reuses_the_prefix_across_chunks(tiny_pair):
    runtime = tiny_pair.runtimes()[0]
    runtime.forward([Row("a", SYSTEM + [1, 2], [41])])
    runtime.release("a")
    first = Row("b", SYSTEM[:16], [15])
    runtime.forward([first])  # the first chunk: 15 of 16 from the cache
    rest = Row("b", SYSTEM[16:] + [3, 4], [25])
    runtime.forward([rest])  # the next chunk continues from the cache where its tokens agree
    assert first.reused == 15 and rest.reused == len(SYSTEM) - 16
    assert runtime.length("b") == len(SYSTEM) + 2


def test_llama_cpp_keeps_released_prefixes_in_host_memory_not_in_kv_cells(tiny_models):
    """A released session's KV leaves the KV buffer (kept cells would lengthen every step's
    attention) for host memory, within its byte budget, least recently used out; a hit restores it
    and computes the same logits as a fresh prefill."""
    from specserve.runtime.llama_runtime import LlamaCppRuntime

    probe = LlamaCppRuntime(tiny_models.gguf[0], 256, max_sessions=2, kv_tokens=512, threads=1)
    probe.forward([Row("p", [3, *SYSTEM], [0])])
    one_entry = probe._ll.llama_state_seq_get_size(probe.ctx, probe.seq_ids["p"])
    runtime = LlamaCppRuntime(tiny_models.gguf[0], 256, max_sessions=2, kv_tokens=512, threads=1,
                              cache_bytes=one_entry + one_entry // 2)
    for i, sid in enumerate(("a", "b")):
        runtime.forward([Row(sid, [i + 3, *SYSTEM], [0])])
        runtime.release(sid)
    assert runtime.cached_tokens == len(SYSTEM) + 1  # "a" (the oldest) gave way to "b"
    assert runtime.free_ids and len(runtime.seq_ids) == 0  # no sequence or cell held for either
    prompt = [4, *SYSTEM, 5]
    row = Row("c", prompt, [len(prompt) - 1])
    (hit,) = runtime.forward([row])
    (fresh,) = LlamaCppRuntime(tiny_models.gguf[0], 256, max_sessions=2, kv_tokens=512, threads=1,
                               cache_bytes=0).forward([Row("c", prompt, [len(prompt) - 1])])
    assert row.reused == len(SYSTEM) + 1 and runtime.length("c") == len(prompt)
    torch.testing.assert_close(hit, fresh, atol=1e-3, rtol=1e-3)
    missing = Row("d", [3, *SYSTEM, 6], [len(SYSTEM) + 1])
    runtime.forward([missing])
    assert missing.reused == 0  # "a" was evicted
