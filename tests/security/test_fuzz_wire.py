"""Property-based fuzzing of everything a peer's bytes reach before any model runs: msgpack with
limits, the request / chunk / chain / header / reply decoders, activation frames and advert
envelopes. Whatever a peer sends, each decoder returns a value or raises its named refusal
(a ValueError subclass); nothing else escapes, so one hostile message can only fail itself."""

from __future__ import annotations

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataplane import rpc, stage_wire, wire
from discovery.advert import AdvertError
from discovery.envelope import mesh_key_from_secret, open_envelope
from shard.activation_wire import ActivationAssembler, ActivationError, ActivationLimits

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1),
    st.floats(allow_nan=True), st.text(max_size=40), st.binary(max_size=64),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=12), inner, max_size=6)),
    max_leaves=30,
)
# maps shaped like the real messages: the right keys with any values, so decoders get past key checks
KEYS = ["digest", "prompt", "messages", "params", "max_tokens", "temperature", "stop", "seed", "id", "text",
        "token_ids", "finish_reason", "usage", "chain", "sid", "n_prompt", "max_new", "token", "texts",
        "start", "end", "vectors", "tokens", "continuation", "request_id", "b"]
shaped = st.dictionaries(st.sampled_from(KEYS), values, max_size=10)
maps = st.one_of(shaped, st.dictionaries(st.text(max_size=12), values, max_size=6))

DECODERS = [
    wire.decode_request, wire.decode_chunk, wire.decode_embeddings, wire.decode_embed_request,
    wire.decode_load_shard, stage_wire.decode_header, stage_wire.decode_reply, stage_wire.decode_group,
]


@SETTINGS
@given(st.binary(max_size=512))
def test_unpack_takes_any_bytes(data: bytes) -> None:
    try:
        rpc.unpack(data)
    except rpc.PayloadError:
        pass


@SETTINGS
@given(maps)
def test_message_decoders_refuse_by_name(obj: dict) -> None:
    packed = rpc.pack(obj)  # through the real codec, as a peer's message arrives
    for decode in DECODERS:
        try:
            decode(rpc.unpack_map(packed))
        except ValueError:  # PayloadError and the core errors a decoder names
            pass


@SETTINGS
@given(values)
def test_chains_refuse_anything_but_node_ids_and_ranges(value: object) -> None:
    try:
        hops = stage_wire.decode_chain(value)
    except ValueError:
        return
    assert all(len(h.node) == 32 and 0 <= h.start < h.end for h in hops)


@SETTINGS
@given(st.lists(st.dictionaries(st.sampled_from(["pos", "dtype", "shape", "i", "n", "data"]), values, max_size=6),
                max_size=4))
def test_activation_frames_refuse_by_name(frames: list[dict]) -> None:
    assembler = ActivationAssembler(limits=ActivationLimits(hidden_size=64, max_tokens=32))
    for frame in frames:
        try:
            assembler.add(frame)
        except ActivationError:
            assembler.reset()


@SETTINGS
@given(st.one_of(st.binary(max_size=600), values.map(lambda v: msgpack.packb(v, use_bin_type=True))))
def test_advert_envelopes_refuse_by_name(data: bytes) -> None:
    try:
        open_envelope(data, mesh_key_from_secret("fuzz"))
    except AdvertError:
        pass
