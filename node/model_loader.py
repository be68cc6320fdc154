"""What a node serves and offers: whole models (llama.cpp or torch), layer ranges (torch), and GGUFs
offered to the mesh for ranges on request, all within the node's --memory-budget."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from discovery.advert import FileAdvert
from engine.local_models import LocalModel
from engine.model_file import ModelFile, ModelFileError, load_model_file
from engine.runner import EngineRunner
from engine.types import EngineLoadError
from node.config import NodeConfig, parse_shard_arg
from node.load_progress import LoadProgress
from node.timed_runner import TimedRunner, queue_wait_histogram
from shard.config import ModelConfig
from shard.memory import estimate_shard_bytes, kv_bytes_per_token_per_layer
from shard.spec import ShardSpec

log = logging.getLogger(__name__)
TORCH_CONTEXT = 2048  # default reserved context per KV slot of the torch engine (--ctx-size)
def _kv_dtype_bytes(config: NodeConfig) -> int:
    return 4 if config.kv_dtype == "32" else 2  # --kv-dtype: 16-bit by default



def _launches_overlap(device: str) -> bool:
    """Whether the torch engine's Triton kernels launch with PDL on `device` (engine/pdl.py): CUDA
    Hopper+ with a Triton that has it. False without Triton, which a CUDA node need not have."""
    import torch

    if torch.device(device).type != "cuda":
        return False
    try:
        from engine.pdl import enabled
    except ImportError:
        return False
    return enabled(torch.device(device))

class BudgetError(ValueError):
    """What the node was asked to load does not fit its --memory-budget."""


# what one unloadable model raises: the torch loader's ShardLoadError and ModelConfigError are
# ValueErrors (caught as such, so a gateway-only node never imports torch to name them)
_LOAD_ERRORS: tuple[type[Exception], ...] = (ModelFileError, EngineLoadError, ValueError)


def torch_shard_bytes(model: ModelFile, spec: ShardSpec, config: NodeConfig, context: int) -> int:
    """What the torch engine holds for `spec`: weights in the node's --weights form, KV, buffers."""
    from shard.footprint import model_weight_bytes  # gguf and the reader cache: only when needed
    from shard.loader import read_model_config

    mc = read_model_config(model.path)
    weights = model_weight_bytes(model.path, mc.n_layers, config.weights, config.device)
    ctx = min(context, mc.context_length)
    return estimate_shard_bytes(
        mc, spec, weights, kv_dtype_bytes=_kv_dtype_bytes(config), context_tokens=ctx,
        n_sessions=config.kv_sessions, window_tokens=_window_tokens(mc, config, ctx),
    ).total


def _window_tokens(mc: ModelConfig, config: NodeConfig, context: int) -> int | None:
    """Positions the sliding-window layers' KV pool holds, as the torch engine sizes it (None: no window)."""
    from shard.memory import PREFILL_CHUNK, SESSIONS_PER_CONTEXT, window_pool_tokens

    if not mc.sliding_window:
        return None
    bs = 32  # engine/torch_model.py's KV block
    chunk = PREFILL_CHUNK["cpu" if config.device == "cpu" else "cuda"]
    full_pool = config.kv_sessions * -(-context // bs) * bs
    return window_pool_tokens(mc.sliding_window, config.kv_sessions * SESSIONS_PER_CONTEXT, context, chunk, bs, full_pool)


def file_advert(model: ModelFile, config: NodeConfig, context: int) -> FileAdvert:
    """Byte figures of the torch engine for this file, so a planner without the file can place it.

    Layers of a mixed-type file (Q4_K_M) differ in size: the largest is advertised, so a plan never
    puts more on a node than fits."""
    from shard.footprint import model_weight_bytes
    from shard.loader import read_model_config

    mc = read_model_config(model.path)
    w = model_weight_bytes(model.path, mc.n_layers, config.weights, config.device)
    return FileAdvert(
        digest=model.digest,
        alias=model.alias,
        n_layers=model.n_layers,
        layer_bytes=max(w.layers),
        embed_bytes=w.embed,
        head_bytes=w.head,  # on a last stage that is not also the first, a tied head is held apart
        kv_bytes_per_token_per_layer=kv_bytes_per_token_per_layer(mc, _kv_dtype_bytes(config)),
        ctx=min(context, mc.context_length) * config.kv_sessions,  # KV tokens reserved over all slots
    )


class ModelManager:
    """Loads models for the node and keeps the memory budget's books."""

    def __init__(self, config: NodeConfig, on_load_change: Callable[[], None]) -> None:
        self.config = config
        self._on_load_change = on_load_change
        self._used_bytes = 0
        self._offered: dict[str, ModelFile] = {}
        self._lock = threading.Lock()
        self.context = config.ctx_size or TORCH_CONTEXT
        self.queue_wait = queue_wait_histogram()  # registered by the node with its other metrics
        self.progress = LoadProgress()

    @property
    def budget_free_bytes(self) -> int:
        budget = self.config.memory_budget_bytes
        return 0 if budget is None else max(0, budget - self._used_bytes)

    def file_adverts(self) -> tuple[FileAdvert, ...]:
        return tuple(file_advert(m, self.config, self.context) for m in self._offered.values())

    def offered(self, digest: str) -> ModelFile | None:
        return self._offered.get(digest)

    def offered_files(self) -> list[ModelFile]:
        return list(self._offered.values())

    def add_cached(self, path: str, digest: str, alias: str) -> ModelFile:
        """Blocking: a GGUF of the weights cache (fetched from the mesh, named by its digest, maybe only
        some layers' tensors) becomes offered, so load_range can load the ranges it holds. Its digest
        is the manifest's, not re-hashed: a partial file's own sha256 is not the model's."""
        from pathlib import Path

        from engine.model_file import known_alias, read_metadata

        model = self._offered.get(digest)
        if model is None or model.path != str(path):
            name = known_alias(digest, self.config.data_dir) or alias or digest[:12]
            model = read_metadata(Path(path), digest, name)
            self._offered[digest] = model
        return model

    def _reserve(self, what: str, need_bytes: int) -> None:
        budget = self.config.memory_budget_bytes
        if budget is not None and self._used_bytes + need_bytes > budget:
            raise BudgetError(
                f"{what} needs {need_bytes / 2**20:.0f} MiB but only {self.budget_free_bytes / 2**20:.0f} MiB "
                f"of --memory-budget {budget} bytes is left"
            )
        self._used_bytes += need_bytes

    def _runner(self, engine: object, model: ModelFile, parallel: int = 1) -> EngineRunner:
        return TimedRunner(engine, parallel=parallel, max_queue=self.config.max_queue,
                           on_load_change=self._on_load_change, waits=self.queue_wait, model=model.alias)

    def _torch(self, model: ModelFile, spec: ShardSpec) -> LocalModel:
        import torch  # torch loads only on nodes that use it

        from engine.linear import WeightsForm, int4_kernel_for
        from engine.torch_engine import TorchShardEngine
        from shard.memory import SESSIONS_PER_CONTEXT

        c = self.config
        weights: WeightsForm = "full" if c.weights == "full" else "quantized"  # NodeConfig validated it
        kv_dtype = torch.float32 if c.kv_dtype == "32" else None  # None: the engine's 16-bit default
        # The paged KV pool holds --kv-sessions full contexts (what the budget counts); sessions take
        # blocks as they grow, so SESSIONS_PER_CONTEXT times as many shorter ones share it.
        sessions = c.kv_sessions * SESSIONS_PER_CONTEXT
        int4_kernel = int4_kernel_for(c.int4_kernel, c.kv_sessions, _launches_overlap(c.device))
        engine = TorchShardEngine(model, spec=spec, device=c.device, threads=c.threads, weights=weights,
                                  int4_kernel=int4_kernel, kv_dtype=kv_dtype, max_sessions=sessions,
                                  max_context=self.context, kv_tokens=c.kv_sessions * self.context)
        # As many requests in flight as sessions: the engine batches their decode steps.
        return LocalModel(model, self._runner(engine, model, parallel=sessions), "torch", spec)

    def load_initial(self) -> list[LocalModel]:
        """Blocking: every --model (whole, or offered when it exceeds the budget), --shard and --offer.

        A model that cannot be loaded (unreadable, an unsupported tensor type, a corrupt tensor) is
        logged in one line naming what is wrong, and the node serves the others; only when nothing
        at all could be loaded does the first error stop the node."""
        loaded: list[LocalModel] = []
        failed: list[tuple[str, Exception]] = []
        c = self.config
        for name in c.models:
            try:
                local = self._load_whole(name)
            except _LOAD_ERRORS as e:
                failed.append((f"not serving {name}", e))
                continue
            if local is not None:
                loaded.append(local)
        for arg in c.shards:
            try:
                loaded.append(self._load_shard_arg(arg))
            except _LOAD_ERRORS as e:
                failed.append((f"not serving --shard {arg}", e))
        for name in c.offers:
            try:
                model = load_model_file(name, c.data_dir)
            except ModelFileError as e:
                failed.append((f"not offering {name}", e))
                continue
            self._offered[model.digest] = model
        if failed and not loaded and not self._offered:
            raise failed[0][1]  # nothing to serve: the node stops with this one line
        for what, error in failed:
            log.error("%s: %s", what, error)
        return loaded

    def _load_whole(self, name: str) -> LocalModel | None:
        """A --model: loaded whole, or offered to the mesh (None) when it exceeds the budget."""
        c = self.config
        model = load_model_file(name, c.data_dir)
        whole = ShardSpec.whole_model(model.digest, model.n_layers)
        # mmapped llama.cpp weights; its KV cache is small next to them at these context sizes
        need = torch_shard_bytes(model, whole, c, self.context) if c.engine == "torch" else model.size_bytes
        try:
            self._reserve(model.alias, need)
        except BudgetError as e:
            log.warning("%s; offering its layers to the mesh instead", e)
            self._offered[model.digest] = model
            return None
        try:
            with self.progress.track(model.alias, need):
                if c.engine == "torch":
                    local = self._torch(model, whole)
                else:
                    from engine.llama_cpp_engine import LlamaCppEngine

                    engine = LlamaCppEngine(model, n_ctx=c.ctx_size, threads=c.threads)
                    local = LocalModel(model, self._runner(engine, model), engine.engine_name, whole)
        except BaseException:
            self._used_bytes -= need
            raise
        log.info("loaded %s (%s, %d layers, %s)", model.alias, model.short_digest, model.n_layers, c.engine)
        return local

    def _load_shard_arg(self, arg: str) -> LocalModel:
        c = self.config
        name, start, end = parse_shard_arg(arg)
        model = load_model_file(name, c.data_dir)
        if end > model.n_layers:
            raise ValueError(f"--shard {arg}: {model.alias} has only {model.n_layers} layers")
        local = self._torch_within_budget(model, ShardSpec(model.digest, start, end, model.n_layers))
        log.info("loaded layers [%d, %d) of %s", start, end, model.alias)
        return local

    def _torch_within_budget(self, model: ModelFile, spec: ShardSpec) -> LocalModel:
        """Reserves the range's bytes, loads it, and gives the bytes back if loading fails."""
        need = torch_shard_bytes(model, spec, self.config, self.context)
        self._reserve(f"layers [{spec.start}, {spec.end}) of {model.alias}", need)
        try:
            with self.progress.track(f"{model.alias} layers {spec.start}-{spec.end}", need):
                return self._torch(model, spec)
        except BaseException:
            self._used_bytes -= need
            raise

    def load_range(self, digest: str, start: int, end: int) -> LocalModel:
        """Blocking: loads layers [start, end) of an offered file, within the budget (LoadShard)."""
        model = self._offered.get(digest)
        if model is None:
            raise ValueError(f"model {digest[:12]} is not offered here")
        with self._lock:
            local = self._torch_within_budget(model, ShardSpec(model.digest, start, end, model.n_layers))
        log.info("loaded layers [%d, %d) of %s on request", start, end, model.alias)
        return local

    def release_range(self, local: LocalModel) -> None:
        """Gives back the budget a load_range took, once that range is unloaded (idle)."""
        need = torch_shard_bytes(local.model, local.shard, self.config, self.context)
        with self._lock:
            self._used_bytes = max(0, self._used_bytes - need)
