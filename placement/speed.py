"""Node speed to time per layer: the one conversion every planner and router uses.

An advert's `speed_tok_s` is the node's measured decode rate over the layers it runs, so one layer
costs 1000 / (speed × layers) ms. A node that has not measured yet gets the caller's `unknown_ms`.
"""

from __future__ import annotations


def ms_per_layer(speed_tok_s: float, n_layers: int, unknown_ms: float) -> float:
    return 1000.0 / (speed_tok_s * n_layers) if speed_tok_s > 0 and n_layers > 0 else unknown_ms
