"""TorchShardEngine: a layer range of a GGUF model in torch, with sessions for pipeline stages.

On a whole model it implements the `Engine` protocol (generate, embed, count_tokens). On any shard it
offers the stage API the pipeline drives: open_session, forward_stage / prefill_stage / decode_stage,
sample (last stage) and close_session. Concurrent callers' steps are batched by a StepCombiner.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from core.types import EmbedInput
from engine.linear import WEIGHTS_FORMS, Int4Kernel, LinearFactory, WeightsForm
from engine.model_file import ModelFile
from engine.prompt_ids import checked_ids
from engine.sampling import SamplerState, sample
from engine.session_errors import SessionError, SessionLimitError
from engine.tokenizer import GGUFTokenizer
from engine.torch_batcher import Step, StepCombiner
from engine.torch_generate import generate_whole
from engine.torch_model import ShardModel
from engine.torch_schedule import StepScheduler
from engine.types import Chunk, GenerationRequest, SamplingParams
from shard.config import ModelConfig
from shard.loader import default_dtype, load_shard
from shard.memory import PREFILL_CHUNK
from shard.spec import ShardSpec

# prompt positions per batch (shard.memory.PREFILL_CHUNK): CPU 128, ~0.1 s of SmolLM2 prefill on 2
# cores, the longest a decode step waits for a prompt; CUDA 512, compute-bound already at 8B (larger
# only delays other sessions' tokens)


def _outcome(step: Step) -> torch.Tensor | Exception:
    if step.error is not None:
        return step.error if isinstance(step.error, Exception) else RuntimeError(repr(step.error))
    assert step.result is not None
    return step.result


@dataclass(slots=True)
class _Session:
    slot: int
    n_past: int = 0  # positions [0, n_past) are in the KV cache
    sampler: SamplerState | None = None
    busy: bool = False
    closed: bool = False  # closed while a step was in flight: its slot is freed when the step ends


class TorchShardEngine:
    def __init__(
        self,
        model_file: ModelFile,
        *,
        spec: ShardSpec | None = None,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        threads: int | None = None,
        max_sessions: int = 8,
        max_context: int = 2048,
        batch_wait_s: float = 0.002,
        weights: WeightsForm = "quantized",
        int4_kernel: Int4Kernel = "tinygemm",
        kv_dtype: torch.dtype | None = None,
        kv_tokens: int | None = None,
        prefill_chunk: int | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        if weights not in WEIGHTS_FORMS:
            raise ValueError(f"weights must be one of {WEIGHTS_FORMS}")
        if threads is not None:
            torch.set_num_threads(threads)  # process-wide: torch has no per-module thread pool
        self.model = model_file
        self.spec = spec or ShardSpec.whole_model(model_file.digest, model_file.n_layers)
        if self.spec.model_digest != model_file.digest:
            raise ValueError(f"shard {self.spec} is not of model {model_file.short_digest}")
        dev = torch.device(device)
        self._ggml = None
        if weights == "quantized" and dev.type == "cpu":
            from engine.ggml_cpu import GgmlCpu  # llama-cpp-python's ggml, loaded only here

            self._ggml = GgmlCpu(n_threads=torch.get_num_threads())
        # activations: fp32 on CPU (ggml takes fp32 input), 16-bit on CUDA
        act = dtype or (torch.float32 if dev.type == "cpu" else default_dtype(dev))
        shard_weights = load_shard(model_file.path, self.spec)
        self.config: ModelConfig = shard_weights.config
        self.weights_form: WeightsForm = weights
        # prompt positions per batch: a long prompt runs in chunks between other sessions' decode steps
        self.prefill_chunk = prefill_chunk or PREFILL_CHUNK["cpu" if dev.type == "cpu" else "cuda"]
        if self.prefill_chunk < 1:
            raise ValueError("prefill_chunk must be >= 1")
        self.shard = ShardModel(
            shard_weights, LinearFactory(weights, dev, act, self._ggml, int4_kernel), max_sessions=max_sessions,
            max_context=min(max_context, self.config.context_length), kv_dtype=kv_dtype, kv_tokens=kv_tokens,
            cuda_graphs=cuda_graphs, window_step=self.prefill_chunk,
        )
        del shard_weights
        self.device = self.shard.device
        self.tokenizer = GGUFTokenizer(model_file.path)
        self._lock = threading.Lock()  # guards _sessions and _free
        self._slot_freed = threading.Condition(self._lock)
        self._sessions: dict[str, _Session] = {}
        self._free = list(range(max_sessions - 1, -1, -1))
        # A decode batch on worker threads waits up to batch_wait_s for the steps of every open session
        # (a pipeline stage's own wait is for its group: dataplane/stage_batcher.py). (Waiting for half
        # of them on a pipeline stage, so that two micro-batches alternate between stages, measured
        # the same: 4 streams through 2 stages gave 1.80x one stream against 1.85x in lockstep.)
        self.batch_wait_s = batch_wait_s
        self._combiner = StepCombiner(
            StepScheduler(self.shard, self.prefill_chunk, self.spec.is_last).run_batch,
            expected=lambda: len(self._sessions), gather_s=batch_wait_s,
        )
        self.preemptions = 0  # sessions that yielded their KV blocks to the others (yield_blocks)
        self._closed = False

    # -- sessions -------------------------------------------------------------------------------

    @property
    def max_sessions(self) -> int:
        return self.shard.max_sessions

    @property
    def max_context(self) -> int:
        return self.shard.max_context

    @property
    def n_sessions(self) -> int:
        with self._lock:
            return len(self._sessions)

    def open_session(
        self, session_id: str, params: SamplingParams | None = None, *, wait_s: float = 0.0, ring: int = 1
    ) -> None:
        """Takes a KV slot for `session_id`; `params` sets up its sampler (needed on the last stage).
        `ring`: the pipeline stages its steps go round when this engine's stage drives it (the first
        stage), so that they batch in that many micro-batches (engine/torch_batcher.py).

        Waits up to `wait_s` for a free slot, then raises SessionError.
        """
        sampler = SamplerState(params, self.device) if params is not None else None
        with self._lock:
            if self._closed:
                raise SessionError("engine closed")
            if session_id in self._sessions:
                raise SessionError(f"session {session_id!r} already open")
            if not self._slot_freed.wait_for(lambda: bool(self._free), timeout=wait_s):
                raise SessionLimitError(f"all {self.max_sessions} sessions busy")
            self._sessions[session_id] = _Session(slot=self._free.pop(), sampler=sampler)
            self._combiner.opened(self._sessions[session_id].slot, ring)

    def close_session(self, session_id: str) -> bool:
        """Frees the session's KV slot and blocks (once its step in flight, if any, ends); returns False
        when it was not open (closing twice is fine)."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
            if session is None:
                return False
            session.closed = True
            if not session.busy:
                self._free_slot(session.slot)
            return True

    def _free_slot(self, slot: int) -> None:
        """Holding the lock: the slot's blocks back to the pool, the slot to the free list."""
        self.shard.release(slot)
        self._combiner.closed(slot)
        self._free.append(slot)
        self._slot_freed.notify()

    @property
    def kv_free_blocks(self) -> int:
        return self.shard.kv.free_blocks

    def yield_blocks(self, session_id: str) -> None:
        """Returns the session's KV blocks to the pool and forgets its positions (it keeps its slot):
        a session the pool could not grow steps aside for the others, then recomputes its positions
        (`blocks_free`) when they have finished: preemption by recompute, as vLLM's."""
        with self._lock:
            s = self._get(session_id)
            if s.busy:
                raise SessionError(f"session {session_id!r} has a step in flight")
            self.shard.release(s.slot)
            s.n_past = 0
            self.preemptions += 1

    def blocks_free(self, positions: int) -> bool:
        """Whether the pool now has the blocks for a session of `positions` positions."""
        return self.shard.kv.can_hold(positions)

    def session_length(self, session_id: str) -> int:
        """Positions of the session already in the KV cache (the next input starts there)."""
        with self._lock:
            return self._get(session_id).n_past

    # -- stage steps ----------------------------------------------------------------------------

    def forward_stage(
        self, session_ids: Sequence[str], inputs: Sequence[torch.Tensor], positions: Sequence[int]
    ) -> list[torch.Tensor]:
        """Runs new positions of several sessions; they are batched with other threads' steps.

        inputs[i]: token ids [T_i] (first stage) or hidden states [T_i, hidden] for session_ids[i],
        starting at positions[i] (<= the session's length; smaller rewinds it). Returns per session
        hidden states [T_i, hidden], or on the last stage float32 logits of its last position [1, vocab].
        Raises the first step's error; a step that cannot run (checked before batching) runs none.
        """
        results = self.run_steps(session_ids, inputs, positions, all_or_none=True)
        assert results is not None  # only now=True declines
        for r in results:
            if isinstance(r, Exception):
                raise r
        return results  # type: ignore[return-value]

    def run_steps(
        self, session_ids: Sequence[str], inputs: Sequence[torch.Tensor], positions: Sequence[int], *,
        now: bool = False, all_or_none: bool = False,
    ) -> list[torch.Tensor | Exception] | None:
        """`forward_stage`, with each step's own result or error: a bad step fails its session only
        (all_or_none: a step that cannot run raises before any runs).

        now=True runs the steps as one batch on the calling thread with no wait for others, or returns
        None, having run nothing, while a batch is in flight or queued (a worker thread's prompt chunk).
        """
        if not len(session_ids) == len(inputs) == len(positions):
            raise ValueError("session_ids, inputs and positions must have the same length")
        if len(set(session_ids)) != len(session_ids):
            raise SessionError("a session may appear once per call")
        claims: list[tuple[Step, _Session] | SessionError] = []
        try:
            for sid, x, pos in zip(session_ids, inputs, positions, strict=True):
                claims.append(self._claim(sid, x, pos))
        except BaseException:  # not a refusal (those are returned): release what was claimed
            self._settle([c for c in claims if not isinstance(c, Exception)])
            raise
        taken = [c for c in claims if not isinstance(c, Exception)]
        refused = next((c for c in claims if isinstance(c, Exception)), None)
        if all_or_none and refused is not None:
            self._settle(taken)
            raise refused
        steps = [step for step, _ in taken]
        ran = True
        try:
            if now:
                ran = self._combiner.run_now(steps)
            elif steps:
                try:
                    self._combiner.submit(steps)
                except Exception:  # noqa: BLE001 - every step holds its own result or error
                    pass
        finally:
            self._settle(taken)
        if not ran:
            return None
        return [c if isinstance(c, Exception) else _outcome(c[0]) for c in claims]

    def _settle(self, taken: Sequence[tuple[Step, _Session]]) -> None:
        """Steps back from the combiner (run or not): their sessions out of flight, advanced by a step
        that ran."""
        with self._lock:
            for step, s in taken:
                s.busy = False
                if s.closed:  # closed meanwhile (cancel): its blocks were kept for this step
                    self._free_slot(s.slot)
                elif step.done and step.error is None:
                    s.n_past = step.start_pos + step.x.shape[0]

    def _claim(self, sid: str, x: torch.Tensor, pos: int) -> tuple[Step, _Session] | SessionError:
        """The session's step, marked in flight; or why it cannot run (checked before batching)."""
        with self._lock:
            try:
                s = self._get(sid)
                self._check_input(sid, x)
                if s.busy:
                    raise SessionError(f"session {sid!r} already has a step in flight")
                if not 0 <= pos <= s.n_past or pos + x.shape[0] > self.max_context:
                    raise SessionError(
                        f"session {sid!r}: positions [{pos}, {pos + x.shape[0]}) do not follow its "
                        f"{s.n_past} cached positions within the context of {self.max_context}"
                    )
            except SessionError as e:
                return e
            s.busy = True
            return Step(slot=s.slot, x=x, start_pos=pos), s

    def step_cap(self) -> int:
        """The most steps one batch takes here (engine/torch_batcher.py, `StepCombiner.cap`)."""
        return self._combiner.cap()

    def decode_ready(self, n: int) -> bool:
        """Whether a decode batch of n steps runs without first capturing a CUDA graph (warm-ups,
        kernel compiles: up to seconds, which an event loop must not spend)."""
        graphs = self.shard.graphs
        return graphs is None or graphs.ready(n)

    def prefill_stage(self, session_id: str, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        return self.forward_stage([session_id], [x], [start_pos])[0]

    def decode_stage(
        self, session_ids: Sequence[str], x: torch.Tensor, positions: Sequence[int]
    ) -> torch.Tensor:
        """One token per session: x is [B] token ids or [B, hidden]; returns [B, hidden] or [B, vocab]."""
        return torch.cat(self.forward_stage(session_ids, list(x.unsqueeze(1)), positions))

    def sample(self, session_ids: Sequence[str], logits: torch.Tensor) -> list[int]:
        """Last stage: one token per session from logits [B, vocab], with each session's sampler."""
        with self._lock:
            states = [self._get(sid).sampler for sid in session_ids]
        if any(s is None for s in states):
            raise SessionError("sample() needs sessions opened with sampling params")
        return sample(states, logits)  # type: ignore[arg-type]

    # -- Engine protocol (whole model) --------------------------------------------------------------

    def generate(self, request: GenerationRequest, cancel: threading.Event) -> Iterator[Chunk]:
        self._require_whole("generate")
        return generate_whole(self, request, cancel)

    @torch.inference_mode()
    def embed(self, texts: list[EmbedInput]) -> list[list[float]]:
        """Mean-pooled final hidden state (after the output norm), L2-normalised; hidden_size floats.
        An input is text or token ids of this model's vocabulary."""
        self._require_whole("embed")
        out = []
        for i, text in enumerate(texts):
            if isinstance(text, tuple):
                ids = checked_ids(text, self.tokenizer.vocab_size, "input")[: self.max_context]
            else:
                ids = self.tokenizer.encode_parts([(text, False)])[: self.max_context] or [self.tokenizer.bos_id]
            sid = f"_embed-{threading.get_ident()}-{i}"
            self.open_session(sid, wait_s=60.0)
            try:
                with self._lock:
                    slot = self._sessions[sid].slot
                step = Step(slot=slot, x=torch.tensor(ids), start_pos=0, last="hidden")
                h = self._combiner.submit([step])[0]  # [T, hidden], serialised with other steps
            finally:
                self.close_session(sid)
            v = torch.nn.functional.normalize(h.float().mean(dim=0), dim=0)
            out.append(v.tolist())
        return out

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode_parts([(text, False)]))  # client text: no special tokens

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._sessions.clear()
        self.tokenizer.close()
        # ggml's buffers are freed with the GgmlCpu when the last layer referencing it is collected

    # -- internals ------------------------------------------------------------------------------

    def _get(self, session_id: str) -> _Session:
        s = self._sessions.get(session_id)
        if s is None:
            raise SessionError(f"no open session {session_id!r}")
        return s

    def _require_whole(self, what: str) -> None:
        if not self.spec.whole:
            raise RuntimeError(f"{what} needs the whole model; this engine holds {self.spec}")

    def _check_input(self, sid: str, x: torch.Tensor) -> None:
        """A step's input must be what this shard runs: token ids [T] in the vocabulary on the first
        stage, hidden states [T, hidden] of a float dtype otherwise (a peer's activations are hostile)."""
        c = self.config
        if self.spec.start == 0:
            ok = (x.dim() == 1 and x.shape[0] >= 1 and not x.is_floating_point() and not x.is_complex()
                  and int(x.min()) >= 0 and int(x.max()) < c.vocab_size)
            want = f"token ids [T] below {c.vocab_size}"
        else:
            ok = x.dim() == 2 and x.shape[0] >= 1 and x.shape[1] == c.hidden_size and x.is_floating_point()
            want = f"hidden states [T, {c.hidden_size}]"
        if not ok:
            raise SessionError(f"session {sid!r}: this stage takes {want}, not {x.dtype} {list(x.shape)}")
