"""The llama.cpp runtime: a GGUF model through llama-cpp-python's low-level API.

One context per model, one sequence id per session (`n_seq_max` = the session limit), one
`llama_decode` per batched step with logits requested only where they are wanted, and
`llama_memory_seq_rm` for rollback and release. With a unified KV buffer (`kv_unified`), one
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

log = logging.getLogger(__name__)


def _quiet_llama() -> None:
    # llama.cpp's spinning worker threads would steal the cores of the other model service on the
    # machine; passive waiting must be set before the OpenMP runtime starts, so before the import.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)


class LlamaCppRuntime:
    """Not thread-safe: call from one worker thread."""

    def __init__(self, gguf: Path, max_context: int = 0, max_sessions: int = 64, kv_tokens: int = 16384,
                 threads: int = 0, kv_unified: bool = True, n_batch: int = 512):
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
        self.lengths: dict[str, int] = {}
        self.seq_ids: dict[str, int] = {}
        self.free_ids = list(range(max_sessions - 1, -1, -1))
        desc = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self.model, desc, len(desc))
        eog = [t for t in range(self.vocab_size) if llama_cpp.llama_vocab_is_eog(self.vocab, t)]
        self.info = RuntimeInfo("llama.cpp", str(gguf), "cpu", desc.value.decode(errors="replace"), eog)
        log.info("llama.cpp: %s, %d threads, %d sessions over %d KV positions (unified=%s), context %d",
                 self.info.dtype, cparams.n_threads, max_sessions, kv_tokens, kv_unified, self.max_context)

    @property
    def kv_tokens(self) -> int:
        return sum(self.lengths.values())

    def length(self, session_id: str) -> int:
        return self.lengths.get(session_id, 0)

    def truncate(self, session_id: str, length: int) -> None:
        assert 0 <= length <= self.length(session_id), (session_id, length)
        if session_id not in self.seq_ids:
            return
        self._ll.llama_memory_seq_rm(self.memory, self.seq_ids[session_id], length, -1)
        self.lengths[session_id] = length

    def release(self, session_id: str) -> None:
        seq = self.seq_ids.pop(session_id, None)
        if seq is not None:
            self._ll.llama_memory_seq_rm(self.memory, seq, -1, -1)
            self.free_ids.append(seq)
            del self.lengths[session_id]

    def _seq(self, session_id: str) -> int:
        seq = self.seq_ids.get(session_id)
        if seq is None:
            if not self.free_ids:
                raise ResourceExhausted(f"all {len(self.seq_ids)} llama.cpp sequences are in use")
            seq = self.seq_ids[session_id] = self.free_ids.pop()
            self.lengths[session_id] = 0
        return seq

    def forward(self, rows: list[Row]) -> list[torch.Tensor]:
        """Rows (their `keep` ascending) go into one `llama_decode` while they fit `n_batch` positions; longer work (a big
        prefill) is split over several calls, in order, so each sequence's positions stay contiguous."""
        before = {row.session_id: self.length(row.session_id) for row in rows}
        new = {row.session_id for row in rows if row.session_id not in self.seq_ids}
        try:
            return self._forward(rows)
        except Exception:
            # A failed call leaves no half-written positions, and no sequence held for a new session.
            for session_id, length in before.items():
                if session_id in new:
                    self.release(session_id)
                elif session_id in self.seq_ids:
                    self.truncate(session_id, min(length, self.lengths[session_id]))
            raise

    def _forward(self, rows: list[Row]) -> list[torch.Tensor]:
        out: list[list[np.ndarray]] = [[] for _ in rows]
        pending: list[tuple[int, int]] = []  # (row, batch index) whose logits to read
        n = 0
        for r, row in enumerate(rows):
            seq = self._seq(row.session_id)
            keep = set(row.keep)
            for i, token in enumerate(row.tokens):
                if n == self.n_batch:
                    self._decode(n, pending, out)
                    pending, n = [], 0
                self.batch.token[n] = token
                self.batch.pos[n] = self.lengths[row.session_id]
                self.batch.n_seq_id[n] = 1
                self.batch.seq_id[n][0] = seq
                self.batch.logits[n] = i in keep
                if i in keep:
                    pending.append((r, n))
                self.lengths[row.session_id] += 1
                n += 1
        if n:
            self._decode(n, pending, out)
        return [torch.from_numpy(np.stack(o)) if o else torch.empty(0, self.vocab_size) for o in out]

    def _decode(self, n: int, pending: list[tuple[int, int]], out: list[list[np.ndarray]]) -> None:
        self.batch.n_tokens = n
        status = self._ll.llama_decode(self.ctx, self.batch)
        if status != 0:
            raise ResourceExhausted(f"llama_decode returned {status} (KV buffer full?)")
        for r, index in pending:
            ptr = self._ll.llama_get_logits_ith(self.ctx, index)
            out[r].append(np.ctypeslib.as_array(ptr, shape=(self.vocab_size,)).copy())

    def close(self) -> None:
        self._ll.llama_batch_free(self.batch)
        self._ll.llama_free(self.ctx)
        self._ll.llama_model_free(self.model)
