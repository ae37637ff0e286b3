"""The llama.cpp runtime: a GGUF model through llama-cpp-python's low-level API.

One context per model, one sequence id per session (`n_seq_max` = the session limit), one
`llama_decode` per batched step with logits requested only where they are wanted, and
`llama_memory_seq_rm` for rollback. Prefix caching: a new session takes the longest matching prefix
of a running session through `llama_memory_seq_cp` (cells shared within the unified buffer, not
copied), or of a released one from its KV saved to host memory (`llama_state_seq_get_data` at
release into a ring of `cache_bytes`, oldest out first; restored with `llama_state_seq_set_data`).
With a unified KV buffer (`kv_unified`), one
call over several sequences costs about what the same number of positions in one sequence costs;
without it, 1 + 4 positions over two sequences cost half as much again.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

import numpy as np
import torch

from specserve.errors import InvalidArgument, ResourceExhausted
from specserve.runtime.base import Row, RuntimeInfo
from specserve.runtime.prefix import MIN_REUSE, PrefixIndex
from specserve.runtime.prefix import skip as _skip
from specserve.runtime.ring import Ring

log = logging.getLogger(__name__)


def _quiet_llama() -> None:
    # llama.cpp's OpenMP worker threads spin at each barrier, then sleep: passive waiting made every
    # single-token decode of the built-in target 45% slower on 2 cores (60 vs 41 ms, a barrier per
    # operation). How long they spin after a forward is set per process (services/__init__.py).
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)


class LlamaCppRuntime:
    """Not thread-safe: call from one worker thread."""

    def __init__(self, gguf: Path, max_context: int = 0, max_sessions: int = 64, kv_tokens: int = 16384,
                 threads: int = 0, kv_unified: bool = True, n_batch: int = 512, cache_bytes: int = 1 << 30):
        _quiet_llama()
        import llama_cpp
        import llama_cpp._logger  # routes llama.cpp's log through Python logging (errors only)

        self._ll = llama_cpp
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), mparams)
        if not self.model:
            raise InvalidArgument("model", f"llama.cpp could not load {gguf}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.vocab_size = llama_cpp.llama_vocab_n_tokens(self.vocab)
        train_ctx = llama_cpp.llama_model_n_ctx_train(self.model)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = kv_tokens
        cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_seq_max = max_sessions
        cparams.kv_unified = kv_unified
        cparams.n_threads = cparams.n_threads_batch = threads or os.cpu_count() or 1
        cparams.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise InvalidArgument("model", f"llama.cpp could not create a context for {gguf}")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        # Each sequence may use the whole buffer when unified; else the buffer is split evenly.
        per_seq = llama_cpp.llama_n_ctx_seq(self.ctx)
        self.max_context = min(max_context or train_ctx, train_ctx, per_seq)
        self.n_batch = n_batch
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.device = torch.device("cpu")
        self.prefix = PrefixIndex()
        # Prefix reuse shares KV cells between sequences, which needs them in one buffer.
        self.reuse = kv_unified
        self.seq_ids: dict[str, int] = {}  # live sessions
        self.saved = Ring(cache_bytes if self.reuse else 0)  # released sessions' KV, by cache key
        self.free_ids = list(range(max_sessions - 1, -1, -1))
        desc = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self.model, desc, len(desc))
        eog = [t for t in range(self.vocab_size) if llama_cpp.llama_vocab_is_eog(self.vocab, t)]
        self.info = RuntimeInfo("llama.cpp", str(gguf), "cpu", desc.value.decode(errors="replace"), eog)
        log.info("llama.cpp: %s, %d threads, %d sessions over %d KV positions (unified=%s), context %d",
                 self.info.dtype, cparams.n_threads, max_sessions, kv_tokens, kv_unified, self.max_context)

    @property
    def kv_tokens(self) -> int:
        return sum(len(t) for t in self.prefix.live.values())

    @property
    def cached_tokens(self) -> int:
        return self.prefix.retired_tokens

    def length(self, session_id: str) -> int:
        return len(self.prefix.live.get(session_id, ()))

    def truncate(self, session_id: str, length: int) -> None:
        assert 0 <= length <= self.length(session_id), (session_id, length)
        if session_id not in self.seq_ids:
            return
        self._ll.llama_memory_seq_rm(self.memory, self.seq_ids[session_id], length, -1)
        self.prefix.truncate(session_id, length)

    def release(self, session_id: str) -> None:
        """The session's KV is saved to host memory as prefix cache (the ring of `cache_bytes`,
        oldest out) and its cells freed: cells kept in the KV buffer would lengthen every later
        step's attention (2,000 kept cells made each decode step 17% slower)."""
        if session_id not in self.seq_ids:
            return
        seq = self.seq_ids[session_id]
        size = self._ll.llama_state_seq_get_size(self.ctx, seq) \
            if self.saved.capacity and self.length(session_id) >= MIN_REUSE else 0
        if 0 < size <= self.saved.capacity:
            name = self.prefix.retire(session_id)
            address, evicted = self.saved.put(name, size)
            for old in evicted:
                self.prefix.drop(old)
            if self._ll.llama_state_seq_get_data(self.ctx, _bytes(address), size, seq) != size:
                self.saved.drop(name)
                self.prefix.drop(name)
        self._drop(session_id)

    def _drop(self, session_id: str) -> None:
        seq = self.seq_ids.pop(session_id)
        self._ll.llama_memory_seq_rm(self.memory, seq, -1, -1)
        self.free_ids.append(seq)
        self.prefix.drop(session_id)

    def _seq(self, session_id: str) -> int:
        seq = self.seq_ids.get(session_id)
        if seq is None:
            if not self.free_ids:
                raise ResourceExhausted(f"all {len(self.seq_ids)} llama.cpp sequences are in use")
            seq = self.seq_ids[session_id] = self.free_ids.pop()
            self.prefix.tokens(session_id)
        return seq

    def _reuse(self, row: Row) -> Row:
        """A row that reads a prompt (or its next chunk) takes the longest cached prefix of the
        session's tokens and runs only the rest: a running session's cells are shared
        (`llama_memory_seq_cp`, no copy), a released one's saved KV is restored (a copy into free
        cells, then cut to the prefix)."""
        if not self.reuse or not row.keep or row.keep[0] < MIN_REUSE:
            return row
        seq = self._seq(row.session_id)
        held = self.length(row.session_id)
        source, n = self.prefix.longest(row.session_id, row.tokens, row.keep[0])
        if source is None:
            return row
        if source in self.seq_ids:
            self._ll.llama_memory_seq_cp(self.memory, self.seq_ids[source], seq, held, n)
        else:
            # A restore replaces the whole sequence; the session's own `held` tokens are the saved
            # prefix's first ones, so nothing is lost (a failed restore leaves it to compute all).
            address, size = self.saved.address(source)
            if self._ll.llama_state_seq_set_data(self.ctx, _bytes(address), size, seq) != size:
                previous = list(self.prefix.live[row.session_id])
                self._ll.llama_memory_seq_rm(self.memory, seq, -1, -1)
                self.prefix.truncate(row.session_id, 0)
                return Row(row.session_id, previous + row.tokens, [i + held for i in row.keep], row.argmax)
            self._ll.llama_memory_seq_rm(self.memory, seq, n, -1)
        return _skip(row, n - held, self.prefix)

    def forward(self, rows: list[Row]) -> list[torch.Tensor]:
        """Rows (their `keep` ascending) go into one `llama_decode` while they fit `n_batch` positions; longer work (a big
        prefill) is split over several calls, in order, so each sequence's positions stay contiguous."""
        before = {row.session_id: self.length(row.session_id) for row in rows}
        new = {row.session_id for row in rows if row.session_id not in self.seq_ids}
        try:
            return self._forward([self._reuse(row) for row in rows])
        except Exception:
            # A failed call leaves no half-written positions, and no sequence held for a new session.
            for session_id, length in before.items():
                if session_id in new and session_id in self.seq_ids:
                    self._drop(session_id)
                elif session_id in self.seq_ids:
                    self.truncate(session_id, min(length, self.length(session_id)))
            raise

    def _forward(self, rows: list[Row]) -> list[torch.Tensor]:
        # Each kept logits row is copied once, into `logits`; argmax rows are read in place.
        slots = np.cumsum([0] + [0 if r.argmax else len(r.keep) for r in rows])
        logits = np.empty((int(slots[-1]), self.vocab_size), dtype=np.float32)
        ids = [np.empty(len(r.keep), dtype=np.int64) if r.argmax else None for r in rows]
        pending: list[tuple[int, int, int]] = []  # (row, output index within the row, batch index)
        n = 0
        for r, row in enumerate(rows):
            seq = self._seq(row.session_id)
            held = self.prefix.tokens(row.session_id)
            keep = {index: j for j, index in enumerate(row.keep)}
            for i, token in enumerate(row.tokens):
                if n == self.n_batch:
                    self._decode(n, pending, rows, slots, logits, ids)
                    pending, n = [], 0
                self.batch.token[n] = token
                self.batch.pos[n] = len(held)
                self.batch.n_seq_id[n] = 1
                self.batch.seq_id[n][0] = seq
                self.batch.logits[n] = i in keep
                if i in keep:
                    pending.append((r, keep[i], n))
                held.append(token)
                n += 1
        if n:
            self._decode(n, pending, rows, slots, logits, ids)
        return [torch.from_numpy(ids[r]) if row.argmax else torch.from_numpy(logits[slots[r] : slots[r + 1]])
                for r, row in enumerate(rows)]

    def _decode(self, n: int, pending: list[tuple[int, int, int]], rows: list[Row], slots: np.ndarray,
                logits: np.ndarray, ids: list[np.ndarray | None]) -> None:
        self.batch.n_tokens = n
        status = self._ll.llama_decode(self.ctx, self.batch)
        if status != 0:
            raise ResourceExhausted(f"llama_decode returned {status} (KV buffer full?)")
        for r, j, index in pending:
            row = np.ctypeslib.as_array(self._ll.llama_get_logits_ith(self.ctx, index), shape=(self.vocab_size,))
            if rows[r].argmax:
                ids[r][j] = row.argmax()
            else:
                logits[slots[r] + j] = row

    def close(self) -> None:
        self.saved.close()
        self._ll.llama_batch_free(self.batch)
        self._ll.llama_free(self.ctx)
        self._ll.llama_model_free(self.model)


def _bytes(address: int) -> ctypes._Pointer:
    return ctypes.cast(address, ctypes.POINTER(ctypes.c_uint8))
