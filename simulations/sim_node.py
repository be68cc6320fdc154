"""One simulated node: a real identity, a real `PeerTable`, and the advert it would publish."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from discovery.advert import Addresses, Load, ModelAdvert, NodeAdvert, Resources
from discovery.envelope import encode_signed
from discovery.identity import Identity
from discovery.peer_table import PeerTable
from placement.choose_holder import FailureRecord
from simulations.catalog import BANDWIDTH_EFFICIENCY, DeviceProfile

# Nodes advertise speed as tok/s on a reference model reading this many bytes per token; the
# planner's `cluster_from_adverts` is given the same figure (see placement/from_adverts.py).
SPEED_REFERENCE_BYTES = 1_000_000_000


@dataclass(slots=True)
class SimNode:
    """Mutable simulation state of one node (the adverts it emits are the frozen, real thing)."""

    index: int
    identity: Identity
    node_id: str  # cached: Identity derives it by hashing on every access
    device: DeviceProfile
    site: str
    free_memory_bytes: int
    table: PeerTable | None  # None: a non-observer, whose own table the simulation skips
    models: tuple[ModelAdvert, ...] = ()
    alive: bool = False
    seq: int = 0
    active: int = 0
    queue: list[object] = field(default_factory=list)
    capacity: int = 4
    failures: dict[str, FailureRecord] = field(default_factory=dict)  # gateway-side FailureRecord per node
    inflight: dict[str, int] = field(default_factory=dict)
    wire_bytes: int = 0

    def advert(self, now: float, ttl_s: float) -> NodeAdvert:
        unified = self.device.name.startswith(("m2", "cpu"))
        total = int(self.device.memory_bytes * self.device.usable_fraction)
        speed = self.device.bandwidth_bytes_per_s * BANDWIDTH_EFFICIENCY / SPEED_REFERENCE_BYTES
        return NodeAdvert(
            node_id=self.node_id,
            name=f"sim-{self.index}",
            version="0.1.0",
            public_key=self.identity.public_key_raw,
            addresses=Addresses(http=f"10.0.{self.index // 250}.{self.index % 250}:8080",
                                grpc=f"10.0.{self.index // 250}.{self.index % 250}:50051"),
            models=self.models,
            resources=Resources(
                device="cpu" if self.device.name.startswith("cpu") else ("mps" if unified else "cuda"),
                vram_total_bytes=0 if unified else total,
                vram_free_bytes=0 if unified else self.free_memory_bytes,
                ram_total_bytes=total if unified else 64 * 2**30,
                ram_free_bytes=self.free_memory_bytes if unified else 32 * 2**30,
                speed_tok_s=speed,
            ),
            load=Load(active=self.active, queued=len(self.queue), capacity=self.capacity),
            seq=self.seq,
            issued_at=now,
            ttl_s=ttl_s,
        )

    def measure_wire_bytes(self, now: float, ttl_s: float, mesh_key: bytes) -> int:
        """Size of the real signed envelope; adverts barely change size, so once is enough."""
        if not self.wire_bytes:
            self.wire_bytes = len(encode_signed(self.advert(now, ttl_s), self.identity, mesh_key))
        return self.wire_bytes


def make_identity(rng: random.Random) -> Identity:
    """A deterministic Ed25519 identity from the simulation's seed (never os.urandom)."""
    return Identity(Ed25519PrivateKey.from_private_bytes(rng.randbytes(32)))
