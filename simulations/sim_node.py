"""One simulated node: a real identity and certificate, a real `Discovery` (Publisher, validation,
PeerTable) on the simulated clock, and the advert content the node describes."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from discovery.advert import Addresses, Load, ModelAdvert, NodeAdvert, Resources
from discovery.identity import Identity
from discovery.service import Discovery
from discovery.tls_cert import make_tls_cert
from placement.choose_holder import FailureRecord
from simulations.catalog import BANDWIDTH_EFFICIENCY, DeviceProfile

if TYPE_CHECKING:
    from simulations.serving import Server
    from simulations.sim_transport import SimHost

# Nodes advertise speed as tok/s on a reference model reading this many bytes per token; the
# planner's `cluster_from_adverts` is given the same figure (see placement/from_adverts.py).
SPEED_REFERENCE_BYTES = 1_000_000_000
_CERT_CHARS = 619  # most P-256 certificates come out this long; fixed so byte counts repeat per seed


@dataclass(slots=True, eq=False)
class SimNode:
    """Mutable simulation state of one node (what it signs and sends is the production code's)."""

    index: int
    identity: Identity
    node_id: str  # cached: Identity derives it by hashing on every access
    device: DeviceProfile
    site: str
    free_memory_bytes: int
    receives: bool  # False: a node whose receiving the run skips (bytes are still counted)
    tls_cert: str = ""
    models: tuple[ModelAdvert, ...] = ()
    alive: bool = False
    capacity: int = 4
    server: Server | None = None  # a whole-model holder's slots
    failures: dict[str, FailureRecord] = field(default_factory=dict)  # the gateway's failure book
    inflight: dict[str, int] = field(default_factory=dict)
    discovery: Discovery = None  # type: ignore[assignment]  # set by attach()
    host: SimHost = None  # type: ignore[assignment]
    tracking: dict[str, float] = field(default_factory=dict)  # record key -> last lookup (records mode)
    publish_pending: bool = False

    @property
    def ip(self) -> str:
        return f"10.{self.index // 62500}.{self.index // 250 % 250}.{self.index % 250 + 1}"

    @property
    def http_address(self) -> str:
        return f"{self.ip}:8080"

    def content(self) -> NodeAdvert:
        """The node's advert source: what it holds, its resources and load (Discovery fills the rest)."""
        unified = self.device.name.startswith(("m2", "cpu"))
        total = int(self.device.memory_bytes * self.device.usable_fraction)
        speed = self.device.bandwidth_bytes_per_s * BANDWIDTH_EFFICIENCY / SPEED_REFERENCE_BYTES
        server = self.server
        active = len(server.running) if server is not None else 0
        queued = len(server.queue) if server is not None else 0
        return NodeAdvert(
            node_id=self.node_id,
            name=f"sim-{self.index}",
            version="0.1.0",
            public_key=self.identity.public_key_raw,
            addresses=Addresses(http=self.http_address, grpc=f"{self.ip}:50051"),
            models=self.models,
            resources=Resources(
                device="cpu" if self.device.name.startswith("cpu") else ("mps" if unified else "cuda"),
                vram_total_bytes=0 if unified else total,
                vram_free_bytes=0 if unified else self.free_memory_bytes,
                ram_total_bytes=total if unified else 64 * 2**30,
                ram_free_bytes=self.free_memory_bytes if unified else 32 * 2**30,
                speed_tok_s=speed,
            ),
            load=Load(active=active, queued=queued, capacity=self.capacity),
            seq=0,
            issued_at=0.0,
            ttl_s=10.0,
            tls_cert=self.tls_cert,
        )

    def advert_now(self) -> NodeAdvert:
        """Our own advert as the router sees it (MeshView.me): the content, signed fields filled."""
        return self.discovery.publisher.current_content()


def make_identity(rng: random.Random) -> Identity:
    """A deterministic Ed25519 identity from the simulation's seed (never os.urandom)."""
    return Identity(Ed25519PrivateKey.from_private_bytes(rng.randbytes(32)))


def make_cert(node_id: str) -> str:
    """A real data-plane certificate (advert validation checks it names the node), of a fixed length."""
    for _ in range(32):
        _, cert = make_tls_cert(node_id)
        if len(cert) == _CERT_CHARS:
            return cert
    return cert


def attach_discovery(node: SimNode, mesh_key: bytes, clock: Callable[[], float], ttl_s: float,
                     refresh_s: float) -> Discovery:
    """The production Discovery of this node, with no transport of its own (the simulator's attach)."""
    node.discovery = Discovery(node.identity, mesh_key, node.content, _table(node), clock=clock, mdns=False,
                               multicast=False, fetch_advert=_no_fetch, ttl_s=ttl_s, refresh_s=refresh_s)
    return node.discovery


def _table(node: SimNode):  # noqa: ANN202
    from discovery.peer_table import PeerTable

    return PeerTable(node.node_id)


async def _no_fetch(host: str, port_http: int, port_grpc: int) -> bytes:  # never awaited: use_transports
    raise OSError("the simulator fetches missed adverts itself")
