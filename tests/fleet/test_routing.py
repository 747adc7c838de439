"""Rendezvous routing as pure functions: stable orders, ~1/N movement, hot-model spread, re-resolution."""

from __future__ import annotations

import inspect
from collections import Counter

import pytest

from weightserve.client.aio import AsyncWeightClient
from weightserve.client.fleet import FleetClient
from weightserve.client.fleet_aio import AsyncFleetClient
from weightserve.client.routing import Health, Resolver, Target, fetch_order, is_fleet, rendezvous
from weightserve.client.sync import WeightClient

MODELS = [f"org/model-{i}" for i in range(2000)]


def replicas(n: int) -> list[str]:
    return [f"10.0.0.{i}:50051" for i in range(1, n + 1)]


def test_every_client_computes_the_same_order_whatever_the_input_order() -> None:
    fleet = replicas(5)
    assert rendezvous("org/a", fleet) == rendezvous("org/a", list(reversed(fleet)))
    assert sorted(rendezvous("org/a", fleet)) == sorted(fleet)


def test_adding_a_replica_moves_about_one_in_n_plus_one_models_and_only_to_the_newcomer() -> None:
    before, after = replicas(8), replicas(9)
    moved = [m for m in MODELS if rendezvous(m, before)[0] != rendezvous(m, after)[0]]
    share = len(moved) / len(MODELS)
    assert 0.5 / 9 < share < 1.5 / 9, f"{share:.3f} of the models moved; rendezvous moves ~1/9"
    assert {rendezvous(m, after)[0] for m in moved} == {after[-1]}, "a model moved between two old replicas"


def test_removing_a_replica_moves_only_its_own_models() -> None:
    fleet = replicas(8)
    gone = fleet[3]
    smaller = [e for e in fleet if e != gone]
    for model in MODELS[:500]:
        owner = rendezvous(model, fleet)[0]
        if owner != gone:
            assert rendezvous(model, smaller)[0] == owner
        else:
            assert rendezvous(model, smaller)[0] == rendezvous(model, fleet)[1], "failover order is the hash order"


def test_models_spread_evenly_over_owners() -> None:
    owners = Counter(rendezvous(m, replicas(4))[0] for m in MODELS)
    assert set(owners) == set(replicas(4))
    assert max(owners.values()) < 1.25 * len(MODELS) / 4


def test_a_hot_model_spreads_over_its_top_replicas_by_rank_and_node() -> None:
    fleet = replicas(8)
    top = rendezvous("org/hot", fleet)[:4]
    firsts = Counter(
        fetch_order("org/hot", fleet, rank=r, spread_key=f"node-{n}", replicas_per_model=4)[0]
        for r in range(8)
        for n in range(64)
    )
    assert set(firsts) == set(top), "a hot model's fetches left its top replicas"
    assert min(firsts.values()) > 512 / 4 * 0.6, f"uneven spread {firsts}"


def test_fetch_order_is_the_chosen_replica_then_the_models_failover_order() -> None:
    fleet = replicas(6)
    order = fetch_order("org/x", fleet, rank=3, spread_key="n", replicas_per_model=3)
    owners = rendezvous("org/x", fleet)
    assert order[0] in owners[:3]
    assert order[1:] == [e for e in owners if e != order[0]]
    assert fetch_order("org/x", fleet, rank=3, replicas_per_model=1) == owners
    with pytest.raises(ValueError, match="replicas_per_model"):
        fetch_order("org/x", fleet, replicas_per_model=0)


def test_fleet_addresses_are_recognised() -> None:
    assert is_fleet(["a:1"])
    assert is_fleet("a:1,b:2")
    assert is_fleet("dns:///weightserve-headless.ns:50051")
    assert not is_fleet("a:1")
    assert not is_fleet("unix:/run/ws.sock")
    assert Target.parse("a:1, b:2,a:1").endpoints == ("a:1", "b:2")
    assert Target.parse("dns:///svc.ns:50051") == Target(host="svc.ns", port=50051)
    with pytest.raises(ValueError, match="port"):
        Target.parse("dns:///svc.ns")
    with pytest.raises(ValueError, match="at least one"):
        Target.parse([])


def test_a_dns_target_is_resolved_again_when_stale_and_keeps_its_answer_when_dns_fails() -> None:
    now = [0.0]
    answers: list[list[str] | OSError] = [["10.0.0.2:1", "10.0.0.1:1"], ["10.0.0.3:1"], OSError("no dns")]
    calls: list[tuple[str, int]] = []

    def lookup(host: str, port: int) -> list[str]:
        calls.append((host, port))
        answer = answers.pop(0)
        if isinstance(answer, OSError):
            raise answer
        return answer

    resolver = Resolver(Target(host="svc", port=1), refresh_seconds=30, lookup=lookup, clock=lambda: now[0])
    assert resolver.endpoints() == ("10.0.0.1:1", "10.0.0.2:1")
    now[0] = 10
    assert resolver.endpoints() == ("10.0.0.1:1", "10.0.0.2:1"), "resolved again before refresh_seconds"
    now[0] = 31
    assert resolver.endpoints() == ("10.0.0.3:1",)
    now[0] = 62
    assert resolver.endpoints() == ("10.0.0.3:1",), "a failed resolution dropped the last good answer"
    assert calls == [("svc", 1)] * 3


def test_the_first_failed_resolution_raises() -> None:
    def lookup(host: str, port: int) -> list[str]:
        raise OSError("no such host")

    with pytest.raises(OSError, match="no such host"):
        Resolver(Target(host="svc", port=1), lookup=lookup).endpoints()


def test_replicas_marked_down_are_tried_last_until_their_cooldown_ends() -> None:
    now = [0.0]
    health = Health(cooldown=5, clock=lambda: now[0])
    health.mark_down("b")
    assert health.live_first(["b", "a", "c"]) == ["a", "c", "b"]
    now[0] = 6
    assert health.live_first(["b", "a", "c"]) == ["b", "a", "c"]
    health.mark_up("a")
    assert health.recently_up("a") and not health.recently_up("b")
    health.mark_down("a")
    assert not health.recently_up("a"), "a replica that failed must be probed again"


def test_a_list_of_addresses_makes_a_fleet_client_and_one_address_does_not() -> None:
    with WeightClient(["127.0.0.1:1", "127.0.0.1:2"]) as fleet, WeightClient("127.0.0.1:1") as one:
        assert isinstance(fleet, FleetClient)
        assert type(one) is WeightClient
        assert fleet.endpoints() == ("127.0.0.1:1", "127.0.0.1:2")


@pytest.mark.parametrize(("base", "fleet"), [(WeightClient, FleetClient), (AsyncWeightClient, AsyncFleetClient)])
def test_fleet_clients_route_every_public_call(base: type, fleet: type) -> None:
    """A call the client gains must be routed here too, or it would use a channel the fleet client lacks."""
    inherited_safely = {"load_into", "update", "last_stats"}  # built on fetch_state_dict / get_manifest
    public = {name for name, _ in inspect.getmembers(base) if not name.startswith("_")}
    missing = {name for name in public - inherited_safely if name not in vars(fleet)}
    assert not missing, f"{fleet.__name__} does not route {sorted(missing)}"


def test_stateful_fetches_go_to_the_models_owner_and_plain_ones_spread() -> None:
    from weightserve.client.common import ShardArgs

    with FleetClient(replicas(6), replicas_per_model=3, spread_key="node-a") as client:
        owners = client.owner_order("org/moe")
        for state in ({"ep_size": 8}, {"since_mapping": 2}, {"version": 3}, {"since_version": 1}):
            assert client.fetch_order(ShardArgs("org/moe", rank=5, world_size=8, **state)) == owners  # type: ignore[arg-type]
        firsts = {client.fetch_order(ShardArgs("org/moe", rank=r, world_size=8))[0] for r in range(8)}
        assert firsts <= set(owners[:3]) and len(firsts) > 1
