"""Device profiles and model shapes, from datasheets and model cards.

Decode is memory-bandwidth bound, so a layer's time is its bytes over achieved bandwidth; we take
70% of the datasheet figure, about what good engines reach (DESIGN.md, "Physics").
"""

from __future__ import annotations

from dataclasses import dataclass

from placement.cluster import ModelSpec

GIB = 2**30
GB = 10**9
BANDWIDTH_EFFICIENCY = 0.7


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    name: str
    memory_bytes: int
    bandwidth_bytes_per_s: float
    overhead_ms: float
    # Unified-memory machines cannot give the whole of it to the model (the OS keeps a share).
    usable_fraction: float = 0.92

    def __post_init__(self) -> None:
        if self.memory_bytes <= 0 or self.bandwidth_bytes_per_s <= 0 or self.overhead_ms < 0:
            raise ValueError(f"bad device profile {self.name}")
        if not 0 < self.usable_fraction <= 1:
            raise ValueError("usable_fraction must be in (0, 1]")

    def layer_time_ms(self, layer_bytes: int) -> float:
        return layer_bytes * 1000.0 / (self.bandwidth_bytes_per_s * BANDWIDTH_EFFICIENCY)


DEVICES: dict[str, DeviceProfile] = {d.name: d for d in (
    DeviceProfile("rtx3060-12gb", 12 * GIB, 360 * GB, 0.30),
    DeviceProfile("rtx3090", 24 * GIB, 936 * GB, 0.25),
    DeviceProfile("rtx4090", 24 * GIB, 1008 * GB, 0.25),
    DeviceProfile("m2-16gb", 16 * GIB, 100 * GB, 0.40, usable_fraction=0.70),
    DeviceProfile("m2-24gb", 24 * GIB, 100 * GB, 0.40, usable_fraction=0.70),
    DeviceProfile("m2-max-64gb", 64 * GIB, 400 * GB, 0.35, usable_fraction=0.75),
    DeviceProfile("h100-80gb", 80 * GIB, 3350 * GB, 0.15),
    DeviceProfile("cpu-ddr5-64gb", 64 * GIB, 50 * GB, 0.50, usable_fraction=0.85),
    DeviceProfile("cpu-ddr5-128gb", 128 * GIB, 50 * GB, 0.50, usable_fraction=0.85),
)}

MB = 10**6

MODELS: dict[str, ModelSpec] = {
    # Llama-3.1-8B, Q4_K_M (~4.9 GB): hidden 4096, 8 KV heads x 128, fp16 KV cache.
    "llama3-8b-q4": ModelSpec(32, 135 * MB, 290 * MB, 290 * MB, 4096, 8192),
    "llama3-8b-bf16": ModelSpec(32, 436 * MB, 1050 * MB, 1050 * MB, 4096, 8192),
    # Llama-2-13B, Q4: no GQA, so a large KV cache per token.
    "llama2-13b-q4": ModelSpec(40, 200 * MB, 92 * MB, 92 * MB, 20480, 10240),
    # Qwen2.5-32B, Q4.
    "qwen2.5-32b-q4": ModelSpec(64, 270 * MB, 436 * MB, 436 * MB, 4096, 10240),
    # Llama-3.1-70B, Q4 and bf16.
    "llama3-70b-q4": ModelSpec(80, 480 * MB, 590 * MB, 590 * MB, 4096, 16384),
    "llama3-70b-bf16": ModelSpec(80, 1712 * MB, 2100 * MB, 2100 * MB, 4096, 16384),
}


@dataclass(frozen=True, slots=True)
class LinkProfile:
    name: str
    latency_ms: float
    bandwidth_bytes_per_s: float


LINKS: dict[str, LinkProfile] = {p.name: p for p in (
    LinkProfile("10gbe", 0.1, 1.25e9),
    LinkProfile("1gbe", 0.3, 1.25e8),
    LinkProfile("wifi", 3.0, 2.5e7),
    LinkProfile("wan", 25.0, 1.25e7),
)}
