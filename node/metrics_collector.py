"""Figures the node already keeps, read at scrape time: engine queues and KV slots, peers, discovery
counters, loads. Nothing on the request path pays for them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from node.daemon import Node


class NodeCollector(Collector):
    def __init__(self, node: Node) -> None:
        self._node = node

    def describe(self) -> list:
        return []  # collected fresh on every scrape; names are fixed below

    def collect(self) -> Iterator:
        yield from self._node_info()
        yield from self._engines()
        yield from self._discovery()
        yield from self._loads()

    def _node_info(self) -> Iterator:
        n = self._node
        info = InfoMetricFamily("meshllm_node", "This node.")
        info.add_metric([], {"node_id": n.node_id, "name": n.name, "version": _version()})
        yield info

    def _engines(self) -> Iterator:
        labels = ["model", "layers"]
        active = GaugeMetricFamily("meshllm_requests_active", "Requests holding an engine slot.", labels=labels)
        queued = GaugeMetricFamily("meshllm_queue_depth", "Requests waiting for an engine slot.", labels=labels)
        capacity = GaugeMetricFamily("meshllm_queue_capacity", "Slots plus queue places; more is a 429.",
                                     labels=labels)
        speed = GaugeMetricFamily("meshllm_decode_tokens_per_second", "Smoothed decode speed of recent requests.",
                                  labels=labels)
        kv_used = GaugeMetricFamily("meshllm_kv_slots_in_use", "KV cache slots (sequences) in use.", labels=labels)
        kv_total = GaugeMetricFamily("meshllm_kv_slots", "KV cache slots (sequences) of the engine.", labels=labels)
        for lm in self._node.local.all():
            key = [lm.model.alias, f"{lm.shard.start}-{lm.shard.end}"]
            load = lm.runner.load
            active.add_metric(key, load.active)
            queued.add_metric(key, load.queued)
            capacity.add_metric(key, load.capacity)
            speed.add_metric(key, lm.runner.tokens_per_s)
            engine = lm.runner.engine
            if hasattr(engine, "n_sessions") and hasattr(engine, "max_sessions"):  # the torch engine's slots
                kv_used.add_metric(key, engine.n_sessions)
                kv_total.add_metric(key, engine.max_sessions)
        yield from (active, queued, capacity, speed, kv_used, kv_total)

    def _discovery(self) -> Iterator:
        n = self._node
        peers = GaugeMetricFamily("meshllm_peers", "Peers in this node's peer table.")
        peers.add_metric([], len(n.table.snapshot(time.time())))
        yield peers
        received = CounterMetricFamily("meshllm_adverts_received", "Adverts and heartbeats received, by transport.",
                                       labels=["source"])
        for source, count in sorted(n.discovery.received.items()):
            received.add_metric([source], count)
        yield received
        rejected = CounterMetricFamily("meshllm_adverts_rejected", "Adverts refused, by reason.", labels=["reason"])
        for reason, count in sorted(n.discovery.rejects.items()):
            rejected.add_metric([reason], count)
        yield rejected
        got = CounterMetricFamily("meshllm_discovery_received_bytes", "Bytes of adverts and heartbeats received.")
        got.add_metric([], n.discovery.received_bytes)
        yield got
        sent = CounterMetricFamily("meshllm_discovery_multicast_sent_bytes",
                                   "Bytes of adverts and heartbeats sent by multicast.")
        sent.add_metric([], n.discovery.multicast_sent_bytes)
        yield sent
        fetches = CounterMetricFamily("meshllm_advert_fetches", "Full adverts fetched over HTTP.")
        fetches.add_metric([], n.discovery.advert_fetches)
        yield fetches

    def _loads(self) -> Iterator:
        progress = GaugeMetricFamily("meshllm_load_progress_ratio", "Model and layer-range loads: 0 to 1.",
                                     labels=["what", "state"])
        for load in self._node.models.progress.snapshot():
            progress.add_metric([load["what"], load["state"]], load["fraction"])
        yield progress


def _version() -> str:
    from node.version import VERSION

    return VERSION
