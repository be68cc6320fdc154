"""The simulator runs the anti-entropy exchange: a node whose gossiped announcement was lost is met by
every node with it, and not before requests flow without it."""

from __future__ import annotations

import dataclasses

from simulations.scenarios import SCENARIOS, run_scenario

LOST = dataclasses.replace(SCENARIOS["lost-announce-48"], n_nodes=24, rest_s=30.0, duration_s=45.0)


def test_a_lost_announcement_is_repaired_by_the_exchange() -> None:
    on = run_scenario(LOST.name, seed=1, config=LOST)
    off = run_scenario(LOST.name, seed=1, config=dataclasses.replace(LOST, anti_entropy=False))
    assert on["lost_announce_met_all_s"] is not None and on["lost_announce_met_all_s"] < 25.0
    # the gap: nothing at rest repairs it; only requests, once they flow after the rest window, dial peers
    assert off["lost_announce_met_all_s"] is None or off["lost_announce_met_all_s"] > LOST.rest_s
    assert on["exchange_digests"] > 0 and off["exchange_digests"] == 0


def test_the_exchange_costs_a_few_percent_at_rest() -> None:
    whole = dataclasses.replace(LOST, lost_announce=0)  # same membership with and without: same beats
    on = run_scenario(LOST.name, seed=1, config=whole)
    off = run_scenario(LOST.name, seed=1, config=dataclasses.replace(whole, anti_entropy=False))
    # one digest per node per period, answered only when it lacks something: no flood
    assert on["rest_sent_bytes_per_s_per_node"] < 1.06 * off["rest_sent_bytes_per_s_per_node"]
    assert on["exchange_relayed_accepted"] <= whole.n_nodes  # start-up races repaired, not a steady flow
