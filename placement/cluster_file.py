"""The cluster JSON format (docs/placement.md) to and from `Cluster`.

Decoding is strict: unknown shapes raise `ValueError` with the offending path, because a silently
ignored typo in a memory size would produce a plan that does not fit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from placement.cluster import Cluster, Link, Links, ModelSpec, NodeSpec

_MODEL_KEYS = ("n_layers", "layer_bytes", "embed_bytes", "head_bytes", "kv_bytes_per_token_per_layer",
               "activation_bytes_per_token")


def _obj(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{path} must be an object")
    return value


def _int(value: Any, path: str) -> int:
    # JSON writers often emit 2.5e10 for big byte counts; accept floats that are whole numbers.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{path} must be an integer, got {value!r}")
    return value


def _num(value: Any, path: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError(f"{path} must be a number, got {value!r}")
    return float(value)


def _link(raw: Any, path: str) -> Link:
    d = _obj(raw, path)
    return Link(_num(d.get("latency_ms"), f"{path}.latency_ms"),
                _num(d.get("bandwidth_bytes_per_s"), f"{path}.bandwidth_bytes_per_s"))


def cluster_from_json(raw: Any) -> Cluster:
    d = _obj(raw, "cluster")
    m = _obj(d.get("model"), "model")
    model = ModelSpec(**{k: _int(m.get(k, 0), f"model.{k}") for k in _MODEL_KEYS})
    nodes_raw = d.get("nodes")
    if not isinstance(nodes_raw, list):
        raise ValueError("nodes must be a list")
    nodes = []
    for i, nr in enumerate(nodes_raw):
        n = _obj(nr, f"nodes[{i}]")
        nodes.append(NodeSpec(
            id=str(n.get("id", "")),
            memory_bytes=_int(n.get("memory_bytes"), f"nodes[{i}].memory_bytes"),
            layer_time_ms=_num(n.get("layer_time_ms"), f"nodes[{i}].layer_time_ms"),
            overhead_ms=_num(n.get("overhead_ms", 0.0), f"nodes[{i}].overhead_ms"),
            total_memory_bytes=_int(n.get("total_memory_bytes", 0), f"nodes[{i}].total_memory_bytes"),
            site=str(n.get("site", "")),
        ))
    links_raw = _obj(d.get("links", {}), "links")
    pairs = {}
    for i, pr in enumerate(links_raw.get("pairs", [])):
        pd = _obj(pr, f"links.pairs[{i}]")
        pairs[(str(pd.get("a")), str(pd.get("b")))] = _link(pd, f"links.pairs[{i}]")
    sites = {}
    for i, sr in enumerate(links_raw.get("sites", [])):
        sd = _obj(sr, f"links.sites[{i}]")
        sites[(str(sd.get("a")), str(sd.get("b")))] = _link(sd, f"links.sites[{i}]")
    links = Links(default=_link(links_raw["default"], "links.default"), pairs=pairs, sites=sites) \
        if "default" in links_raw else Links(pairs=pairs, sites=sites)
    return Cluster(
        model=model,
        nodes=tuple(nodes),
        links=links,
        context_tokens=_int(d.get("context_tokens", 4096), "context_tokens"),
        concurrency=_int(d.get("concurrency", 1), "concurrency"),
    )


def _link_json(link: Link) -> dict[str, float]:
    return {"latency_ms": link.latency_ms, "bandwidth_bytes_per_s": link.bandwidth_bytes_per_s}


def cluster_to_json(c: Cluster) -> dict[str, Any]:
    m = c.model
    nodes = []
    for n in c.nodes:
        node: dict[str, Any] = {"id": n.id, "memory_bytes": n.memory_bytes, "layer_time_ms": n.layer_time_ms,
                                "overhead_ms": n.overhead_ms}
        if n.total_memory_bytes != n.memory_bytes:
            node["total_memory_bytes"] = n.total_memory_bytes
        if n.site:
            node["site"] = n.site
        nodes.append(node)
    links: dict[str, Any] = {"default": _link_json(c.links.default),
                             "pairs": [{"a": a, "b": b, **_link_json(v)} for (a, b), v in c.links.pairs.items()]}
    if c.links.sites:
        links["sites"] = [{"a": a, "b": b, **_link_json(v)} for (a, b), v in c.links.sites.items()]
    return {
        "model": {k: getattr(m, k) for k in _MODEL_KEYS},
        "context_tokens": c.context_tokens,
        "concurrency": c.concurrency,
        "nodes": nodes,
        "links": links,
    }
