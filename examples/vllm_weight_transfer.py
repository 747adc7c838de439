"""A worker that follows vLLM's weight-update phases, fed by weightserve versions.

vLLM's weight-transfer flow (RL trainers updating a running engine) has four phases on
the worker: `init_weight_transfer_engine` (connect once), `start_weight_update` (the
engine stops scheduling), `update_weights` (receive the new tensors and load them) and
`finish_weight_update` (resume). This example drives those phases from weightserve:
`WatchVersions` says when a trainer published, and `fetch_state_dict(since_version=...)`
brings only this rank's changed slices. Everything is received and verified before
the first parameter is written, so a failed update leaves the engine on its old
weights.

Two ways to load, chosen by what the engine's parameters look like:

- `in_place` (default): the engine's parameters carry checkpoint names and hold this
  rank's slices (as `fetch_state_dict(model, rank, world_size)` returns them); each is
  overwritten in place, no new GPU memory.
- `load_weights`: hand `(name, tensor)` pairs to a callable such as vLLM's
  `model.load_weights`, which maps checkpoint names onto fused parameters and slices
  for its own TP rank; then fetch with `world_size=1` (whole changed tensors).

Run against a server (`weightserve serve --state-dir ...`) with
`python examples/vllm_weight_transfer.py ADDRESS MODEL [RANK WORLD_SIZE]`: it loads
the latest version into a stand-in module and applies every version published after.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from weightserve.client import WeightClient

LoadWeights = Callable[[Iterable[tuple[str, torch.Tensor]]], Any]


@dataclass(frozen=True)
class InitInfo:
    """What `init_weight_transfer_engine` needs: where the weights are and which share is ours."""

    address: str
    model: str
    rank: int = 0
    world_size: int = 1
    token: str | None = None


class WeightserveTransfer:
    """The worker side of vLLM's weight-update phases, over weightserve versions."""

    def __init__(self, parameters: dict[str, torch.Tensor], load_weights: LoadWeights | None = None) -> None:
        self.parameters = parameters
        self.load_weights = load_weights
        self.serving = 0
        """The version the engine holds now."""
        self.published: queue.Queue[int] = queue.Queue()
        """Versions the server announced, newest last."""
        self._client: WeightClient | None = None
        self._info: InitInfo | None = None
        self._watch: Any = None
        self._target: int | None = None
        self._updated = 0

    # ----------------------------------------------------------------- phase 1

    def init_weight_transfer_engine(self, info: InitInfo, serving: int) -> None:
        """Connect, and watch for versions after `serving` (leasing it so retention keeps it)."""
        self._info, self.serving = info, serving
        self._client = WeightClient(info.address, token=info.token)
        self._follow(serving)

    # ----------------------------------------------------------------- phase 2

    def start_weight_update(self, timeout: float | None = None) -> int | None:
        """Wait for a published version (up to `timeout` seconds); the newest one announced, or None."""
        try:
            target = self.published.get(timeout=timeout)
        except queue.Empty:
            return None
        while not self.published.empty():
            target = max(target, self.published.get_nowait())
        self._target = target if target > self.serving else None
        return self._target

    # ----------------------------------------------------------------- phase 3

    def update_weights(self) -> int:
        """Fetch this rank's changes since the served version, verified, and load them; the tensors loaded.

        Raises:
            FetchError / InvalidRequestError: nothing was written; the engine keeps its weights.
        """
        client, info = self._connected()
        if self._target is None:
            return 0
        if self.load_weights is None:
            self._updated = client.update(
                self.parameters,
                info.model,
                info.rank,
                info.world_size,
                since_version=self.serving,
                version=self._target,
            )
        else:  # whole changed tensors in checkpoint names: the engine's loader slices them
            delta = client.fetch_state_dict(info.model, since_version=self.serving, version=self._target)
            self.load_weights(delta.items())
            self._updated = self._target
        stats = client.last_fetch_stats
        return stats.tensors if stats is not None else 0

    # ----------------------------------------------------------------- phase 4

    def finish_weight_update(self) -> int:
        """Serve the new version: move the lease onto it; the version now served."""
        if self._target is not None:
            self.serving, self._target = self._updated, None
            self._follow(self.serving)
        return self.serving

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
        if self._client is not None:
            self._client.close()

    # ----------------------------------------------------------------- helpers

    def _connected(self) -> tuple[WeightClient, InitInfo]:
        if self._client is None or self._info is None:
            raise RuntimeError("call init_weight_transfer_engine first")
        return self._client, self._info

    def _follow(self, serving: int) -> None:
        """(Re)open the WatchVersions stream that leases `serving` and feeds `published`."""
        client, info = self._connected()
        old, self._watch = self._watch, client.watch_versions(info.model, serving, serving_version=serving)
        watch = self._watch

        def pump() -> None:
            for version in watch:
                self.published.put(version.version)

        threading.Thread(target=pump, name="weightserve-watch", daemon=True).start()
        if old is not None:
            old.close()


def main(argv: list[str]) -> None:
    address, model = argv[0], argv[1]
    rank, world_size = (int(argv[2]), int(argv[3])) if len(argv) > 3 else (0, 1)
    with WeightClient(address) as client:
        start = client.fetch_state_dict(model, rank, world_size)
        serving = client.last_fetch_stats.version if client.last_fetch_stats else 0
    engine = WeightserveTransfer(start)  # stands in for the engine's parameters
    engine.init_weight_transfer_engine(InitInfo(address, model, rank, world_size), serving)
    print(f"serving version {serving}; waiting for new versions (Ctrl-C stops)")
    try:
        while True:
            if engine.start_weight_update(timeout=1.0) is None:
                continue
            loaded = engine.update_weights()
            print(f"version {engine.finish_weight_update()}: {loaded} tensors updated in place")
    except KeyboardInterrupt:
        pass
    finally:
        engine.close()


if __name__ == "__main__":
    main(sys.argv[1:])
