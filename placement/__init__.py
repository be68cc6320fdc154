"""Pure placement decisions over plain data (no I/O, the clock passed in).

Public entry points, by module (not re-exported here, so that `placement.<module>` stays the module
the simulator patches):
- `choose_holder`: `rank_holders`, `choose_holder` — which node serves a whole-model request.
- `route_pipeline`: `route_pipeline` — the cheapest chain of held layer ranges.
- `plan`, `replan`: `plan_split`, `replan` — what to load where; `cluster`: the dataclasses.
- `offer_plan`: `plan_offer` — a split over the nodes offering a GGUF.
"""
