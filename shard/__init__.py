"""Layer ranges of a model: what a shard is, what it costs in memory, how activations travel.

Light to import (no torch): `shard.loader` and `shard.activation_wire` pull in torch when used.
"""

from shard.config import ModelConfig
from shard.memory import ShardMemory, estimate_shard_bytes
from shard.spec import ShardSpec

__all__ = ["ModelConfig", "ShardMemory", "ShardSpec", "estimate_shard_bytes"]
