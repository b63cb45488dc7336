"""The kind registry is the single source of the adapter kinds: the wire enum and the SDK's enum hold
exactly the registered kinds (adding a kind is one module plus its proto enum value and SDK member)."""

from __future__ import annotations

from adapterserve.models import AdapterKind
from adapterserve.server.adapters.kind import kind_names
from adapterserve.server.api.grpc.convert import adapter_kind_to_proto
from adapterserve.v1 import types_pb2


def test_registry_proto_and_client_enums_hold_the_same_kinds():
    registry = set(kind_names())
    proto = {
        name.removeprefix("ADAPTER_KIND_").lower()
        for name in types_pb2.AdapterKind.keys()
        if name != "ADAPTER_KIND_UNSPECIFIED"
    }
    client = {kind.value for kind in AdapterKind if kind is not AdapterKind.UNSPECIFIED}
    assert registry == proto == client
    assert {kind.name.lower() for kind in AdapterKind} == {kind.value for kind in AdapterKind}


def test_every_registered_kind_has_its_own_wire_value():
    values = [adapter_kind_to_proto(name) for name in kind_names()]
    assert types_pb2.ADAPTER_KIND_UNSPECIFIED not in values
    assert len(set(values)) == len(values)


def test_a_kind_makes_its_peft_config_and_serves_what_it_makes():
    from adapterserve.server.adapters.kind import all_kinds

    made = {k.name: k.peft_config() for k in all_kinds() if k.peft_method is not None}
    assert set(made) >= {"lora", "ia3", "prompt", "prefix", "dora"}
    for kind in all_kinds():
        if kind.name in made:
            assert str(made[kind.name].peft_type.value) in kind.configs, kind.name
    assert made["dora"].use_dora
