"""Loading what a node serves: whole models (llama.cpp or torch) and layer ranges (torch)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from engine.llama_cpp_engine import LlamaCppEngine
from engine.local_models import LocalModel
from engine.model_file import ModelFile, load_model_file
from engine.runner import EngineRunner
from node.config import NodeConfig, parse_shard_arg
from shard.loader import read_model_config
from shard.memory import estimate_shard_bytes
from shard.spec import ShardSpec

log = logging.getLogger(__name__)
TORCH_SESSIONS = 8
TORCH_CONTEXT = 2048


class BudgetError(ValueError):
    """What the node was asked to load does not fit its --memory-budget."""


def _check_budget(config: NodeConfig, what: str, need_bytes: int, used_bytes: int) -> None:
    budget = config.memory_budget_bytes
    if budget is not None and used_bytes + need_bytes > budget:
        raise BudgetError(
            f"{what} needs {need_bytes / 2**20:.0f} MiB but only {max(0, budget - used_bytes) / 2**20:.0f} MiB "
            f"of --memory-budget {budget} bytes is left"
        )


def torch_shard_bytes(model: ModelFile, spec: ShardSpec, device: str) -> int:
    dtype_bytes = 4 if device == "cpu" else 2
    context = min(TORCH_CONTEXT, model.context_length)
    return estimate_shard_bytes(read_model_config(model.path), spec, dtype_bytes, context, TORCH_SESSIONS).total


def load_local_models(config: NodeConfig, on_load_change: Callable[[], None]) -> list[LocalModel]:
    """Blocking: resolves, hashes (digest cached) and loads every model and shard of the config."""
    from engine.torch_engine import TorchShardEngine  # torch loads only on nodes that use it

    loaded: list[LocalModel] = []
    used = 0

    def runner(engine: object) -> EngineRunner:
        return EngineRunner(engine, max_queue=config.max_queue, on_load_change=on_load_change)  # type: ignore[arg-type]

    for name in config.models:
        model = load_model_file(name, config.data_dir)
        if config.engine == "torch":
            spec = ShardSpec.whole_model(model.digest, model.n_layers)
            need = torch_shard_bytes(model, spec, config.device)
            _check_budget(config, model.alias, need, used)
            engine = TorchShardEngine(model, device=config.device, threads=config.threads,
                                      max_sessions=TORCH_SESSIONS, max_context=config.ctx_size or TORCH_CONTEXT)
            loaded.append(LocalModel(model, runner(engine), "torch"))
        else:
            need = model.size_bytes  # mmapped weights; llama.cpp's KV cache is small next to them here
            _check_budget(config, model.alias, need, used)
            engine = LlamaCppEngine(model, n_ctx=config.ctx_size, threads=config.threads)
            loaded.append(LocalModel(model, runner(engine), engine.engine_name))
        used += need
        log.info("loaded %s (%s, %d layers, %s)", model.alias, model.short_digest, model.n_layers, config.engine)
    for arg in config.shards:
        name, start, end = parse_shard_arg(arg)
        model = load_model_file(name, config.data_dir)
        if end > model.n_layers:
            raise ValueError(f"--shard {arg}: {model.alias} has only {model.n_layers} layers")
        spec = ShardSpec(model.digest, start, end, model.n_layers)
        need = torch_shard_bytes(model, spec, config.device)
        _check_budget(config, f"layers [{start}, {end}) of {model.alias}", need, used)
        engine = TorchShardEngine(model, spec=spec, device=config.device, threads=config.threads,
                                  max_sessions=TORCH_SESSIONS, max_context=config.ctx_size or TORCH_CONTEXT)
        loaded.append(LocalModel(model, runner(engine), "torch", start, end))
        used += need
        log.info("loaded layers [%d, %d) of %s", start, end, model.alias)
    return loaded
