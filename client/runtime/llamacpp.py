"""⑧ infer on llama.cpp: a GGUF base, hot-swapped GGUF LoRAs, generation and evaluation
inside a memory budget. Torch-free: llama-cpp-python's bindings, numpy and ``gguf``.

Invariants (the same as the NF4 runtime's, ``client.runtime.runtime``):
* The plan (``client.runtime.gguf_plan``) is made from the GGUF header before the model
  is loaded; a budget that cannot hold it is refused before anything is allocated.
* The context is created with the plan's ``n_ctx`` and never grows; prompts are decoded
  in chunks of ``plan.prefill_chunk_tokens``; a request that does not fit is handled by
  the declared policy (``sliding-window``, ``truncate``, ``refuse``).
* An adapter is materialised as a GGUF LoRA file named by its content digest, written
  atomically (``client.runtime.gguf_lora``), loaded with ``llama_adapter_lora_init`` and
  attached with ``llama_set_adapters_lora``: the base is loaded once and never changes.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import ctypes
import hashlib
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from client.errors import ClientError, ClientInputError
from client.runtime.budget import BudgetTooSmallError, MemoryPlan
from client.runtime.gguf_lora import lora_to_gguf_tensors, write_lora_gguf
from client.runtime.gguf_plan import (
    CTX_STEP,
    GgufFootprint,
    plan_llamacpp_memory,
    read_gguf_footprint,
)
from client.runtime.interface import (
    POLICIES,
    EvalStats,
    Generation,
    fit_request,
    generate_via_stream,
)
from client.runtime.memory import MemoryMeter, release_free_memory
from protocol import LoraShape

__all__ = ["LlamaCppError", "LlamaCppRuntime", "LlamaModel", "llama_log_tail", "lora_file_name"]

logger = logging.getLogger(__name__)
_DEFAULT_ADAPTER_RANK = 16
_LOADED_ADAPTERS = 2  # the attached one and the one before it (a swap back is instant)
_LOG: collections.deque[str] = collections.deque(maxlen=400)
_log_callback: Any = None


class LlamaCppError(ClientError):
    """llama.cpp refused a model, an adapter or a batch (its last log lines attached)."""

    exit_code = 3


def llama_log_tail(lines: int = 3) -> str:
    """The last lines llama.cpp logged (it logs to a buffer here, not to stderr)."""
    return " | ".join(s.strip() for s in list(_LOG)[-lines:] if s.strip())


def _backend() -> Any:
    """Import llama.cpp's bindings once, route its log into ``_LOG``, init the backend."""
    global _log_callback
    try:
        import llama_cpp
    except ImportError as e:
        raise ClientInputError(
            "the llama.cpp runtime needs llama-cpp-python: install fedota's device extra "
            "(pip install 'fedota[device]')"
        ) from e
    if _log_callback is None:

        def on_log(level: int, text: bytes, user_data: Any) -> None:
            del level, user_data
            _LOG.append(text.decode("utf-8", errors="replace"))

        _log_callback = llama_cpp.llama_log_callback(on_log)
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
    return llama_cpp


class LlamaModel:
    """A loaded GGUF model and its vocabulary: tokenize and detokenize as llama.cpp does.

    Args:
        path: The ``.gguf`` file.
        vocab_only: Load the tokenizer only (no weights).

    Raises:
        LlamaCppError: llama.cpp could not load the file.
    """

    def __init__(self, path: Path, *, vocab_only: bool = False) -> None:
        self.lib = _backend()
        params = self.lib.llama_model_default_params()
        params.use_mmap = False  # weights are read into memory: they count once, in RSS
        params.vocab_only = vocab_only
        self.ptr = self.lib.llama_model_load_from_file(str(path).encode(), params)
        if not self.ptr:
            raise LlamaCppError(f"llama.cpp could not load {path}: {llama_log_tail()}")
        self.vocab = self.lib.llama_model_get_vocab(self.ptr)
        self.n_vocab = int(self.lib.llama_vocab_n_tokens(self.vocab))

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        """Token ids of ``text`` (BOS added when the vocabulary says so)."""
        raw = text.encode("utf-8")
        cap = len(raw) + 8
        while True:
            buf = (self.lib.llama_token * cap)()
            n = self.lib.llama_tokenize(self.vocab, raw, len(raw), buf, cap, add_special, True)
            if n >= 0:
                return list(buf[:n])
            cap = -n

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for (special tokens render as nothing)."""
        buf = ctypes.create_string_buffer(64)
        n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def is_end(self, token: int) -> bool:
        """Whether ``token`` ends generation (EOS, EOT...)."""
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    def close(self) -> None:
        """Free the model (idempotent)."""
        if getattr(self, "ptr", None):
            self.lib.llama_model_free(self.ptr)
            self.ptr = None


def lora_file_name(state: Mapping[str, Any], base: GgufFootprint) -> str:
    """The file name the runtime gives the GGUF LoRA of ``state`` on ``base``."""
    return f"lora-{_digest(state, base)[:40]}.gguf"


def _digest(state: Mapping[str, Any], base: GgufFootprint) -> str:
    """Names the GGUF LoRA of ``state`` for ``base``: the conversion depends on the base's
    architecture, depth and heads (rotary row order), so those are hashed in too."""
    h = hashlib.sha256()
    h.update(f"{base.arch}/{base.n_layer}/{base.n_head}/{base.n_head_kv}\0".encode())
    for name in sorted(state):
        arr = np.ascontiguousarray(state[name], dtype=np.float32)
        h.update(name.encode() + b"\0" + str(arr.shape).encode() + b"\0")
        h.update(arr.tobytes())
    return h.hexdigest()


class LlamaCppRuntime:
    """GGUF base + optional LoRA on llama.cpp, answering requests within ``budget_bytes``.

    Args:
        base: The GGUF base file.
        budget_bytes: Memory the runtime may add (``None``: unbounded).
        policy: What to do when a request does not fit the cache (``POLICIES``).
        adapter_reserve_bytes: Budget kept for the adapter (default: rank 16 on every
            linear projection, float32).
        threads: CPU threads (default: up to 4).
        cache_dir: Where materialised GGUF LoRAs live (default: a private temp dir).
        chunk_tokens: Tokens per decode call (prefill chunk).

    Raises:
        ClientInputError: unknown policy, unreadable base, or llama-cpp-python missing.
        BudgetTooSmallError: the budget cannot hold the base (before loading it).
        LlamaCppError: llama.cpp refused the model or the context.
    """

    kind = "llamacpp"

    def __init__(
        self,
        base: Path | str,
        *,
        budget_bytes: int | None = None,
        policy: str = "sliding-window",
        adapter_reserve_bytes: int | None = None,
        threads: int | None = None,
        cache_dir: Path | None = None,
        chunk_tokens: int = 32,
    ) -> None:
        if policy not in POLICIES:
            raise ClientInputError(f"unknown policy {policy!r}; choose one of {POLICIES}")
        self.base_path, self.policy = Path(base), policy
        self.footprint = fp = read_gguf_footprint(self.base_path)
        if adapter_reserve_bytes is None:
            per_layer = 2 * fp.n_embd * 4 + 3 * (fp.n_embd + fp.n_ff)
            adapter_reserve_bytes = _DEFAULT_ADAPTER_RANK * per_layer * fp.n_layer * 4
        self._adapter_reserve = adapter_reserve_bytes
        lib = _backend()
        self.meter = MemoryMeter.start()
        self.plan: MemoryPlan | None = (
            plan_llamacpp_memory(
                fp, budget_bytes, adapter_bytes=adapter_reserve_bytes, chunk_tokens=chunk_tokens
            )
            if budget_bytes is not None
            else None
        )
        unbounded = max(CTX_STEP, min(fp.n_ctx_train, 2048) // CTX_STEP * CTX_STEP)
        self.capacity = self.plan.kv_capacity_tokens if self.plan else unbounded
        self.chunk = self.plan.prefill_chunk_tokens if self.plan else chunk_tokens
        self.threads = threads or max(1, min(4, os.cpu_count() or 1))
        self._own_cache = cache_dir is None
        self.cache_dir = Path(cache_dir or tempfile.mkdtemp(prefix="fedota-lora-"))
        self._adapters: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.adapter_version: int | None = None
        self.model = LlamaModel(self.base_path)
        self.ctx = self._new_context(lib)
        self._batch = lib.llama_batch_init(self.chunk, 0, 1)
        self.load_peak_added_bytes = self.meter.peak_added_bytes()

    def _new_context(self, lib: Any) -> Any:
        params = lib.llama_context_default_params()
        params.n_ctx = self.capacity
        params.n_batch = params.n_ubatch = self.chunk
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = self.threads
        params.type_k = params.type_v = lib.GGML_TYPE_F16
        params.no_perf = True
        ctx = lib.llama_init_from_model(self.model.ptr, params)
        if not ctx:
            raise LlamaCppError(f"llama.cpp could not create a context: {llama_log_tail()}")
        return ctx

    # ------------------------------------------------------------------ adapter
    def set_adapter(
        self,
        state: Mapping[str, Any] | None,
        spec: LoraShape | None = None,
        *,
        version: int | None = None,
    ) -> float:
        """Hot-swap the LoRA adapter (``None``: run the bare base). Returns seconds taken.

        Raises:
            ClientInputError: the state does not match the base's layers.
            BudgetTooSmallError: the adapter is larger than the budget reserved for it.
            LlamaCppError: llama.cpp refused the materialised LoRA.
        """
        lib, t0 = self.model.lib, time.perf_counter()
        if state is None:
            lib.llama_set_adapters_lora(self.ctx, None, 0, None)
            self.adapter_version = None
            return time.perf_counter() - t0
        if spec is None:
            raise ClientInputError("set_adapter needs the LoraShape of the state")
        size = sum(int(np.asarray(v).size) * 4 for v in state.values())
        if size > self._adapter_reserve:
            raise BudgetTooSmallError(
                f"adapter of {size} bytes exceeds the {self._adapter_reserve} bytes reserved "
                "for it; create the runtime with a larger adapter_reserve_bytes",
                needed_bytes=size,
            )
        digest = _digest(state, self.footprint)
        adapter = self._adapters.get(digest) or self._load_adapter(digest, state, spec)
        self._adapters.move_to_end(digest)
        arr = (lib.llama_adapter_lora_p_ctypes * 1)(adapter)
        scale = (ctypes.c_float * 1)(1.0)
        if lib.llama_set_adapters_lora(self.ctx, arr, 1, scale) != 0:
            raise LlamaCppError(f"llama.cpp could not attach the LoRA: {llama_log_tail()}")
        while len(self._adapters) > _LOADED_ADAPTERS:
            _, old = self._adapters.popitem(last=False)
            lib.llama_adapter_lora_free(old)
        self._prune_cache()
        self.adapter_version = version
        return time.perf_counter() - t0

    def _load_adapter(self, digest: str, state: Mapping[str, Any], spec: LoraShape) -> Any:
        fp = self.footprint
        tensors = lora_to_gguf_tensors(
            state, arch=fp.arch, n_blocks=fp.n_layer, n_heads=fp.n_head, n_kv_heads=fp.n_head_kv
        )
        self._check_shapes(tensors, spec)
        path = self.cache_dir / lora_file_name(state, fp)
        # The cache is shared with other runtimes on this device (the app's and the update
        # agent's health check), and each prunes what it has not loaded: a file that
        # vanishes between the check and the load, a temp swept mid-write, or a file
        # llama.cpp refuses is written again once (it is derived from the verified state).
        for attempt in range(2):
            try:
                if not path.is_file():
                    write_lora_gguf(path, tensors, arch=fp.arch, alpha=spec.alpha)
                adapter = self.model.lib.llama_adapter_lora_init(self.model.ptr, str(path).encode())
            except FileNotFoundError:
                if attempt:
                    raise
                continue
            if adapter:
                self._adapters[digest] = adapter
                return adapter
            path.unlink(missing_ok=True)
        raise LlamaCppError(f"llama.cpp refused the LoRA {path.name}: {llama_log_tail()}")

    def _prune_cache(self) -> None:
        """Delete materialised LoRAs of adapters no longer loaded (they are derived)."""
        keep = {f"lora-{d[:40]}.gguf" for d in self._adapters}
        for stale in self.cache_dir.glob("lora-*.gguf"):
            if stale.name not in keep:
                stale.unlink(missing_ok=True)

    def _check_shapes(self, tensors: Mapping[str, np.ndarray], spec: LoraShape) -> None:
        problems = []
        for name, t in tensors.items():
            base_name, _, kind = name.rpartition(".lora_")
            dims = self.footprint.tensor_shapes.get(base_name)
            if dims is None:
                problems.append(f"{name}: no tensor {base_name!r} in the base")
                continue
            want = (spec.rank, dims[0]) if kind == "a" else (dims[1], spec.rank)
            if tuple(t.shape) != want:
                problems.append(f"{name}: shape {tuple(t.shape)}, expected {want}")
        if problems or not tensors:
            raise ClientInputError(
                f"adapter state does not match rank {spec.rank} on "
                f"{spec.target_modules or 'all linear'} projections of this base: "
                f"{len(problems)} bad tensors (e.g. {problems[0] if problems else 'empty'})"
            )

    # ------------------------------------------------------------------ decoding
    def _clear(self) -> None:
        lib = self.model.lib
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)

    def _decode(self, tokens: list[int], start: int, *, all_logits: bool) -> np.ndarray:
        """Decode ``tokens`` at positions ``start..``; return the logits asked for
        (every position, or the last one), as a ``(n, vocab)`` float32 array."""
        lib, b, rows = self.model.lib, self._batch, []
        for i in range(0, len(tokens), self.chunk):
            piece = tokens[i : i + self.chunk]
            last_piece = i + self.chunk >= len(tokens)
            b.n_tokens = len(piece)
            for j, tok in enumerate(piece):
                b.token[j], b.pos[j], b.n_seq_id[j] = tok, start + i + j, 1
                b.seq_id[j][0] = 0
                b.logits[j] = all_logits or (last_piece and j == len(piece) - 1)
            if lib.llama_decode(self.ctx, b) != 0:
                raise LlamaCppError(f"llama.cpp could not decode a batch: {llama_log_tail()}")
            outputs = len(piece) if all_logits else int(last_piece)
            if outputs:
                ptr = lib.llama_get_logits(self.ctx)
                rows.append(np.ctypeslib.as_array(ptr, shape=(outputs, self.model.n_vocab)).copy())
        return np.concatenate(rows) if rows else np.empty((0, self.model.n_vocab), np.float32)

    @staticmethod
    def _pick(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
        if temperature <= 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / temperature
        p = np.exp(z - z.max())
        return int(rng.choice(len(p), p=p / p.sum()))

    def stream(
        self,
        prompt: str,
        max_new_tokens: int = 32,
        *,
        temperature: float = 0.0,
        seed: int = 0,
        stats: dict[str, Any] | None = None,
    ) -> Iterator[str]:
        """Yield the generated text piece by piece.

        Raises:
            RequestTooLargeError: the request does not fit and the policy is ``refuse``.
        """
        given = self.model.tokenize(prompt)
        ids, max_new, applied = fit_request(
            given, max_new_tokens, capacity=self.capacity, policy=self.policy
        )
        rng, utf8 = np.random.default_rng(seed), codecs.getincrementaldecoder("utf-8")("replace")
        self.meter.reset_peak()
        t0, first_token_s = time.perf_counter(), 0.0
        tokens, new, keep = list(ids), 0, max(1, self.capacity // 2)
        self._clear()
        window = tokens[-self.capacity :]
        logits, n_past = self._decode(window, 0, all_logits=False)[-1], len(window)
        max_cache = n_past
        while new < max_new:
            nxt = self._pick(logits, temperature, rng)
            first_token_s = first_token_s or time.perf_counter() - t0
            tokens.append(nxt)
            new += 1
            text = utf8.decode(self.model.piece(nxt))
            if text:
                yield text
            if self.model.is_end(nxt) or new == max_new:
                break
            if n_past + 1 > self.capacity:  # slide: re-encode the newest tokens
                self._clear()
                logits, n_past = self._decode(tokens[-keep:], 0, all_logits=False)[-1], keep
            else:
                logits, n_past = self._decode([nxt], n_past, all_logits=False)[-1], n_past + 1
            max_cache = max(max_cache, n_past)
        tail = utf8.decode(b"", final=True)
        if tail:
            yield tail
        if stats is not None:
            stats.update(
                prompt_tokens=len(given),
                new_tokens=new,
                policy_applied=applied,
                max_cache_tokens=max_cache,
                seconds=time.perf_counter() - t0,
                first_token_s=first_token_s,
                peak_added_bytes=self.meter.peak_added_bytes(),
            )

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 32,
        *,
        temperature: float = 0.0,
        seed: int = 0,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """Generate a continuation of ``prompt`` (greedy unless ``temperature > 0``).

        Raises:
            RequestTooLargeError: the request does not fit and the policy is ``refuse``.
        """
        return generate_via_stream(
            self, prompt, max_new_tokens, temperature=temperature, seed=seed, on_text=on_text
        )

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, texts: list[str]) -> EvalStats:
        """Mean next-token loss and top-1 accuracy, in windows the cache holds."""
        window = self.capacity - 1
        total, correct, count = 0.0, 0, 0
        self.meter.reset_peak()
        for text in texts:
            ids = self.model.tokenize(text)
            for i in range(0, max(1, len(ids) - 1), window):
                piece = ids[i : i + window + 1]
                if len(piece) < 2:
                    continue
                self._clear()
                logits = self._decode(piece[:-1], 0, all_logits=True).astype(np.float64)
                target = np.asarray(piece[1:])
                top = logits.max(axis=1)
                log_z = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
                total += float((log_z - logits[np.arange(len(target)), target]).sum())
                correct += int((logits.argmax(axis=1) == target).sum())
                count += len(target)
        self._clear()
        release_free_memory()
        if count == 0:
            return EvalStats(loss=math.nan, accuracy=math.nan, num_tokens=0)
        return EvalStats(loss=total / count, accuracy=correct / count, num_tokens=count)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Free the adapters, the context and the model (idempotent)."""
        lib = self.model.lib
        for adapter in self._adapters.values():
            lib.llama_adapter_lora_free(adapter)
        self._adapters.clear()
        if getattr(self, "ctx", None):
            lib.llama_batch_free(self._batch)
            lib.llama_free(self.ctx)
            self.ctx = None
        self.model.close()
        if self._own_cache:
            shutil.rmtree(self.cache_dir, ignore_errors=True)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown the OS frees it all
            self.close()
