"""When is our advert worth re-sending in full? Pure: compares two adverts, no clock, no I/O.

At rest a node sends a ~160-byte heartbeat instead of its ~650-byte advert; a new full advert (new seq)
goes out only when its content changed in a way peers act on. Free-memory figures jitter by a few MB
every period (probe_resources), so they count only when they move by a noticeable step.
"""

from __future__ import annotations

import dataclasses

from discovery.advert import NodeAdvert

MIN_FREE_STEP_BYTES = 256 * 2**20  # free memory must move at least this much ...
FREE_STEP_FRACTION = 1 / 32  # ... and at least this share of the total, to be news


def _free_moved(old: int, new: int, total: int) -> bool:
    return abs(new - old) >= max(MIN_FREE_STEP_BYTES, int(total * FREE_STEP_FRACTION))


def significant_change(old: NodeAdvert, new: NodeAdvert) -> bool:
    """True when `new` differs from `old` in anything but seq, issued_at and small free-memory jitter."""
    o, n = old.resources, new.resources
    if (
        _free_moved(o.vram_free_bytes, n.vram_free_bytes, n.vram_total_bytes)
        or _free_moved(o.ram_free_bytes, n.ram_free_bytes, n.ram_total_bytes)
        or _free_moved(o.budget_free_bytes, n.budget_free_bytes, n.ram_total_bytes)
    ):
        return True
    same_free = dataclasses.replace(
        n,
        vram_free_bytes=o.vram_free_bytes,
        ram_free_bytes=o.ram_free_bytes,
        budget_free_bytes=o.budget_free_bytes,
    )
    return dataclasses.replace(new, seq=old.seq, issued_at=old.issued_at, resources=same_free) != old


def comes_from(advert: NodeAdvert, origin: str) -> bool:
    """Does the advert's own HTTP address match where its bytes came from ("host" or "host:port")?"""
    if not origin:
        return False
    if ":" in origin:
        return advert.addresses.http == origin
    return advert.addresses.http.rpartition(":")[0] == origin


def same_content(a: NodeAdvert, b: NodeAdvert) -> bool:
    return dataclasses.replace(a, seq=b.seq, issued_at=b.issued_at) == b
