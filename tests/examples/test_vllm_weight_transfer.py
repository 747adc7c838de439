"""examples/vllm_weight_transfer.py against a real server, with a torch.nn.Module standing in for vLLM."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.conftest import TINY_LLAMA, ServeFn
from weightserve.client import WeightClient
from weightserve.testing import BackgroundServer, write_llama_checkpoint

EXAMPLE = Path(__file__).parents[2] / "examples" / "vllm_weight_transfer.py"
MODEL = "org/tiny-llama"
NORM = "model.norm.weight"
Q_PROJ = "model.layers.1.self_attn.q_proj.weight"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vllm_weight_transfer", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class StandIn(torch.nn.Module):
    """Parameters under checkpoint names (dots become '__'), as an engine would hold them."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name, tensor in state.items():
            self.register_parameter(name.replace(".", "__"), torch.nn.Parameter(tensor.clone(), requires_grad=False))

    def by_checkpoint_name(self) -> dict[str, torch.Tensor]:
        return {name.replace("__", "."): p for name, p in self.named_parameters()}


@pytest.fixture
def server(tmp_path: Path, serve: ServeFn) -> BackgroundServer:
    root = tmp_path / "models"
    write_llama_checkpoint(root / "org" / "tiny-llama", TINY_LLAMA, num_files=1)
    return serve(root, state_dir=tmp_path / "state", metrics_listen="off")


def wait_for_lease(client: WeightClient, version: int, count: int) -> None:
    deadline = time.monotonic() + 20
    while client.list_versions(MODEL)[version].leases != count:
        assert time.monotonic() < deadline, f"version {version} never had {count} leases"
        time.sleep(0.02)


def test_the_four_phases_update_each_tp_rank_in_place_and_move_the_lease(server: BackgroundServer) -> None:
    example = load_example()
    with WeightClient(server.address) as trainer:
        engines, modules = [], []
        for rank in range(2):
            module = StandIn(trainer.fetch_state_dict(MODEL, rank, 2))
            params = module.by_checkpoint_name()
            pointers = {name: p.data_ptr() for name, p in params.items()}
            engine = example.WeightserveTransfer(params)
            engine.init_weight_transfer_engine(example.InitInfo(server.address, MODEL, rank, 2), serving=0)
            engines.append((engine, pointers))
            modules.append(module)
        wait_for_lease(trainer, 0, 2)
        full = trainer.fetch_state_dict(MODEL)
        assert trainer.publish(MODEL, {NORM: full[NORM] * 3, Q_PROJ: full[Q_PROJ] - 1}) == 1

        for (engine, pointers), module in zip(engines, modules, strict=True):
            assert engine.start_weight_update(timeout=20) == 1
            assert engine.update_weights() == 2  # only the two changed tensors were fetched
            assert engine.finish_weight_update() == 1
            params = module.by_checkpoint_name()
            assert {name: p.data_ptr() for name, p in params.items()} == pointers  # written in place
        wait_for_lease(trainer, 1, 2)  # the lease moved onto the version being served
        assert trainer.list_versions(MODEL)[0].leases == 0
        for rank, module in enumerate(modules):
            want = trainer.fetch_state_dict(MODEL, rank, 2)
            got = module.by_checkpoint_name()
            assert all(got[name].equal(want[name]) for name in want)
        for engine, _ in engines:
            assert engine.start_weight_update(timeout=0.2) is None  # nothing newer
            engine.close()


def test_load_weights_mode_hands_whole_changed_tensors_to_the_engines_loader(server: BackgroundServer) -> None:
    example = load_example()
    received: list[tuple[str, torch.Size]] = []

    def load_weights(weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        received.extend((name, tensor.shape) for name, tensor in weights)

    with WeightClient(server.address) as trainer:
        full = trainer.fetch_state_dict(MODEL)
        engine = example.WeightserveTransfer({}, load_weights=load_weights)
        engine.init_weight_transfer_engine(example.InitInfo(server.address, MODEL, 1, 2), serving=0)
        trainer.publish(MODEL, {Q_PROJ: full[Q_PROJ] + 1})
        trainer.publish(MODEL, {NORM: full[NORM] + 1})
        deadline = time.monotonic() + 20
        while engine.published.qsize() < 2:  # both announced: the update goes straight to the newest
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert engine.start_weight_update(timeout=20) == 2
        engine.update_weights()
        assert engine.finish_weight_update() == 2
        engine.close()
    assert sorted(received) == sorted([(Q_PROJ, full[Q_PROJ].shape), (NORM, full[NORM].shape)])


def test_the_example_runs_as_a_script(server: BackgroundServer) -> None:
    with WeightClient(server.address) as trainer:
        norm = trainer.fetch_state_dict(MODEL, names=[NORM])[NORM]
        script = subprocess.Popen(
            [sys.executable, str(EXAMPLE), server.address, MODEL, "0", "2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert script.stdout is not None
            assert script.stdout.readline().startswith("serving version 0")
            wait_for_lease(trainer, 0, 1)
            trainer.publish(MODEL, {NORM: norm + 1})
            assert script.stdout.readline().strip() == "version 1: 1 tensors updated in place"
        finally:
            script.kill()
            script.wait(10)
