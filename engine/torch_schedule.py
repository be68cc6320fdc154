"""One scheduler iteration of a TorchShardEngine: what a batch of queued steps runs.

The StepCombiner (engine/torch_batcher.py) decides which steps make a batch; this decides how they
run: the single-token steps as one decode, then prompt chunks. Each step gets its own result or error.
"""

from __future__ import annotations

import torch

from engine.kv_cache import KVCacheFull
from engine.session_errors import KVFullError
from engine.torch_batcher import Step
from engine.torch_model import ShardModel


class StepScheduler:
    def __init__(self, shard: ShardModel, chunk: int, is_last: bool) -> None:
        self._shard = shard
        self._chunk = chunk  # prompt positions per iteration (TorchShardEngine.prefill_chunk)
        self._is_last = is_last  # the model's last stage: its outputs are logits

    def run_batch(self, batch: list[Step]) -> None:
        """One scheduler iteration: every queued single-token step of distinct sessions as one decode,
        then prompt chunks of up to `prefill_chunk` positions, oldest first, `prefill_chunk` in all.
        A prompt left unfinished stays queued for the next iteration. Each step gets its own result or
        error: one failing step never fails another session's."""
        for s in batch:
            if s.offset == 0:  # a step's blocks, before it joins a batch: a full pool fails this step only
                try:
                    end = s.start_pos + s.x.shape[0]  # window layers' blocks: chunk by chunk (ShardModel.prefill)
                    self._shard.kv.ensure(s.slot, end, s.start_pos, min(end, s.start_pos + self._chunk))
                except (KVCacheFull, ValueError) as e:
                    s.finish(error=KVFullError(str(e)) if isinstance(e, KVCacheFull) else e)
        live = [s for s in batch if not s.done]
        singles = [s for s in live if s.x.shape[0] == 1 and s.last == "last"]
        self._decode(singles)
        # Chunks are cut at fixed offsets of each prompt, whatever else is queued: ggml rounds an
        # M-row product by M, so a prompt's numbers (and tokens) must not depend on its neighbours.
        used = 0
        for s in live:
            if s.done:
                continue
            n = min(s.x.shape[0] - s.offset, self._chunk)
            if used and used + n > self._chunk:
                break
            used += n
            self._prefill_chunk(s, n)

    def _decode(self, singles: list[Step]) -> None:
        if not singles:
            return
        try:
            out = self._shard.decode(
                [s.slot for s in singles], torch.cat([s.x for s in singles]), [s.start_pos for s in singles]
            )
        except Exception:  # noqa: BLE001 - find the culprit: each step alone (rewrites the same positions)
            if len(singles) == 1:
                raise
            for s in singles:
                try:
                    s.finish(self._shard.decode([s.slot], s.x, [s.start_pos]))
                except Exception as e:  # noqa: BLE001
                    s.finish(error=e)
            return
        for i, s in enumerate(singles):
            s.finish(out[i : i + 1])

    def _prefill_chunk(self, s: Step, n: int) -> None:
        """Runs positions [offset, offset + n) of a step's input; finishes the step after its last chunk."""
        final = s.offset + n == s.x.shape[0]
        keep_all = not self._is_last or s.last in ("all", "hidden")  # every position's output
        last = s.last if final or keep_all else "none"  # no head matmul for a prompt's early chunks
        try:
            out = self._shard.prefill(s.slot, s.x[s.offset : s.offset + n], s.start_pos + s.offset, last=last)  # type: ignore[arg-type]
        except Exception as e:  # noqa: BLE001 - this step's failure, handed to its caller
            # a later chunk takes its window layers' blocks when it runs: the pool may be spent by then
            s.finish(error=KVFullError(str(e)) if isinstance(e, KVCacheFull) else e)
            return
        s.offset += n
        if keep_all:
            s.parts.append(out)
        if final:
            s.finish(torch.cat(s.parts) if keep_all and len(s.parts) > 1 else (s.parts[0] if keep_all else out))
