"""Seeded random heterogeneous clusters for the benchmark and the scale scenarios.

All randomness comes from the `random.Random` passed in, never the global one.
"""

from __future__ import annotations

import random
from itertools import combinations

from placement.cluster import Cluster, Link, Links, ModelSpec, NodeSpec
from simulations.catalog import DEVICES, LINKS, MODELS, DeviceProfile

_ACCESS_WEIGHTS = (("lan", 0.7), ("wifi", 0.2), ("wan", 0.1))
_SLOWER = {"lan": 0, "wifi": 1, "wan": 2}


def make_node(rng: random.Random, node_id: str, device: DeviceProfile, model: ModelSpec, site: str = "") -> NodeSpec:
    total = int(device.memory_bytes * device.usable_fraction)
    # Other programs hold part of the memory: free memory is what the planner may use.
    free = int(total * rng.uniform(0.6, 1.0))
    return NodeSpec(
        id=node_id,
        memory_bytes=free,
        layer_time_ms=device.layer_time_ms(model.layer_bytes) * rng.uniform(0.9, 1.1),
        overhead_ms=device.overhead_ms * rng.uniform(0.8, 1.2),
        total_memory_bytes=total,
        site=site,
    )


def _link(name: str) -> Link:
    p = LINKS[name]
    return Link(p.latency_ms, p.bandwidth_bytes_per_s)


def random_cluster(rng: random.Random, n_min: int = 2, n_max: int = 6) -> tuple[str, Cluster]:
    """(model name, cluster) of n_min..n_max nodes with mixed devices, access links and load."""
    model_name = rng.choice(sorted(MODELS))
    model = MODELS[model_name]
    n = rng.randint(n_min, n_max)
    devices = sorted(DEVICES)
    nodes = tuple(make_node(rng, f"n{i}", DEVICES[rng.choice(devices)], model) for i in range(n))
    lan = rng.choice(("1gbe", "10gbe"))
    access = {}
    for node in nodes:
        r = rng.random()
        acc = 0.0
        for name, w in _ACCESS_WEIGHTS:
            acc += w
            if r < acc:
                access[node.id] = name
                break
    pairs = {}
    for a, b in combinations(nodes, 2):
        worst = max(access[a.id], access[b.id], key=_SLOWER.__getitem__)
        if worst != "lan":
            pairs[(a.id, b.id)] = _link(worst)
    cluster = Cluster(
        model=model,
        nodes=nodes,
        links=Links(default=_link(lan), pairs=pairs),
        context_tokens=rng.choice((2048, 4096, 8192)),
        concurrency=rng.choice((1, 1, 2, 4, 8)),
    )
    return model_name, cluster


def large_cluster(rng: random.Random, n_nodes: int, model_name: str = "llama3-70b-q4", concurrency: int = 1,
                  n_sites: int = 4) -> Cluster:
    """A campus: `n_sites` sites on 10GbE inside, a 1GbE-class backbone between them."""
    model = MODELS[model_name]
    devices = sorted(DEVICES)
    sites = [f"site{i}" for i in range(n_sites)]
    nodes = tuple(
        make_node(rng, f"n{i:04d}", DEVICES[rng.choice(devices)], model, site=rng.choice(sites))
        for i in range(n_nodes)
    )
    site_links = {(s, s): _link("10gbe") for s in sites}
    backbone = Link(2.0, 1.25e8)
    for a, b in combinations(sites, 2):
        site_links[(a, b)] = backbone
    return Cluster(model=model, nodes=nodes, links=Links(default=backbone, sites=site_links),
                   context_tokens=4096, concurrency=concurrency)
