"""Where every expert replica lives: the Topology and the versioned ExpertMapping.

Physical slot p of a layer sits on GPU `p // slots_per_gpu`; GPU g sits on node
`g // gpus_per_node`. A mapping is the [layers, physical] table phy2log plus the two
tables derived from it (log2phy, logcnt); `from_phy2log` is the one constructor that
derives them, so the three can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from weightserve.errors import InvalidRequestError


@dataclass(frozen=True)
class Topology:
    """The cluster a mapping was made for.

    Attributes:
        num_nodes: server nodes (the intra-node network is the fast one).
        gpus_per_node: expert-parallel ranks per node.
        num_groups: expert groups of the model (group-limited routing); logical
            expert e is in group `e // (num_logical // num_groups)`.
    """

    num_nodes: int
    gpus_per_node: int
    num_groups: int = 1

    def __post_init__(self) -> None:
        for name in ("num_nodes", "gpus_per_node", "num_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidRequestError(f"topology {name} must be a positive integer, got {value!r}")

    @property
    def num_gpus(self) -> int:
        """Expert-parallel ranks in all."""
        return self.num_nodes * self.gpus_per_node


def replica_counts(phy2log: torch.Tensor, num_logical: int) -> torch.Tensor:
    """[layers, num_logical] int64: how many physical slots hold each logical expert."""
    counts = torch.zeros(phy2log.shape[0], num_logical, dtype=torch.int64)
    return counts.scatter_add_(1, phy2log, torch.ones_like(phy2log))


def held_by_gpu(phy2log: torch.Tensor, num_logical: int, num_gpus: int) -> torch.Tensor:
    """[layers, num_gpus, num_logical] bool: whether a GPU holds at least one replica."""
    layers, num_physical = phy2log.shape
    gpu = torch.arange(num_physical) // (num_physical // num_gpus)
    held = torch.zeros(layers, num_gpus * num_logical, dtype=torch.int64)
    held.scatter_add_(1, gpu * num_logical + phy2log, torch.ones_like(phy2log))
    return held.view(layers, num_gpus, num_logical) > 0


def gpu_loads(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """[layers, num_gpus] float64: tokens each GPU serves when replicas split evenly."""
    counts = replica_counts(phy2log, weight.shape[1]).to(torch.float64)
    share = (weight.to(torch.float64) / counts).gather(1, phy2log)
    return share.view(phy2log.shape[0], num_gpus, -1).sum(-1)


@dataclass(frozen=True, eq=False)
class ExpertMapping:
    """One versioned placement of expert replicas; treat its tensors as read-only.

    Attributes:
        phy2log: [layers, num_physical] int64, the logical expert in each physical slot.
        log2phy: [layers, num_logical, max_replicas] int64, each expert's physical slots
            in ascending order, padded with -1.
        logcnt: [layers, num_logical] int64, replicas per logical expert (>= 1).
        version: 0 for an engine's initial placement, +1 per rebalance.
        topology: the nodes, GPUs per node and expert groups it was made for.
    """

    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor
    version: int
    topology: Topology

    @classmethod
    def from_phy2log(cls, phy2log: torch.Tensor, num_logical: int, topology: Topology, version: int) -> ExpertMapping:
        """Build a mapping from its slot table, deriving log2phy and logcnt.

        Raises:
            InvalidRequestError: slots do not divide over the GPUs, an id is out of
                range, or a logical expert has no replica.
        """
        phy2log = torch.as_tensor(phy2log, dtype=torch.int64).cpu().contiguous()
        if phy2log.dim() != 2:
            raise InvalidRequestError(f"phy2log must be [layers, physical], got shape {list(phy2log.shape)}")
        layers, num_physical = phy2log.shape
        if num_physical % topology.num_gpus:
            raise InvalidRequestError(f"{num_physical} physical slots do not divide over {topology.num_gpus} GPUs")
        if phy2log.numel() and (int(phy2log.min()) < 0 or int(phy2log.max()) >= num_logical):
            raise InvalidRequestError(f"phy2log holds ids outside [0, {num_logical})")
        logcnt = replica_counts(phy2log, num_logical)
        if layers and int(logcnt.min()) < 1:
            layer, expert = (int(i) for i in (logcnt < 1).nonzero()[0])
            raise InvalidRequestError(f"logical expert {expert} has no replica in layer {layer}")
        width = int(logcnt.max()) if logcnt.numel() else 1
        # A stable sort by expert id lists each expert's slots in ascending order.
        slots = phy2log.argsort(dim=1, stable=True)
        experts = phy2log.gather(1, slots)
        first = torch.searchsorted(experts, experts)
        replica = torch.arange(num_physical).expand(layers, -1) - first
        log2phy = torch.full((layers, num_logical * width), -1, dtype=torch.int64)
        log2phy.scatter_(1, experts * width + replica, slots)
        return cls(phy2log, log2phy.view(layers, num_logical, width), logcnt, version, topology)

    @classmethod
    def initial(cls, num_layers: int, num_logical: int, num_physical: int, topology: Topology) -> ExpertMapping:
        """Version 0: the placement an engine starts with.

        Ranks hold contiguous blocks of slots; slot p < num_logical holds expert p and
        redundant slot p >= num_logical holds expert (p - num_logical) % num_logical.

        Raises:
            InvalidRequestError: fewer slots than experts, or slots that do not
                divide over the topology's GPUs.
        """
        if num_layers < 0 or num_logical < 1 or num_physical < num_logical:
            raise InvalidRequestError(
                f"need num_physical >= num_logical >= 1 and num_layers >= 0, got "
                f"{num_physical} physical, {num_logical} logical, {num_layers} layers"
            )
        slots = torch.arange(num_physical)
        row = torch.where(slots < num_logical, slots, (slots - num_logical) % num_logical)
        return cls.from_phy2log(row.expand(num_layers, -1), num_logical, topology, version=0)

    @property
    def num_layers(self) -> int:
        """MoE layers."""
        return int(self.phy2log.shape[0])

    @property
    def num_logical(self) -> int:
        """Logical experts per layer."""
        return int(self.logcnt.shape[1])

    @property
    def num_physical(self) -> int:
        """Physical slots per layer, over all GPUs."""
        return int(self.phy2log.shape[1])

    @property
    def slots_per_gpu(self) -> int:
        """Physical slots each GPU holds (the same for every GPU)."""
        return self.num_physical // self.topology.num_gpus

    def gpu_slots(self, gpu: int) -> range:
        """The physical slot ids GPU `gpu` holds."""
        self._check_gpu(gpu)
        return range(gpu * self.slots_per_gpu, (gpu + 1) * self.slots_per_gpu)

    def experts_on_gpu(self, layer: int, gpu: int) -> list[int]:
        """The logical expert in each of the GPU's slots for `layer`, in slot order."""
        if not 0 <= layer < self.num_layers:
            raise InvalidRequestError(f"layer {layer} out of range; the mapping has {self.num_layers}")
        slots = self.gpu_slots(gpu)
        return [int(e) for e in self.phy2log[layer, slots.start : slots.stop]]

    def new_slots(self, previous: ExpertMapping) -> torch.Tensor:
        """[layers, num_physical] bool: slots whose GPU did not hold their expert in `previous`.

        A set difference per GPU: an expert the GPU already held (in any of its slots)
        is never new, so it can be copied locally. An expert that is new to the GPU is
        new in every slot that holds it.
        """
        self.check_comparable(previous)
        before = held_by_gpu(previous.phy2log, self.num_logical, self.topology.num_gpus)
        gpu = torch.arange(self.num_physical) // self.slots_per_gpu
        had = before.view(self.num_layers, -1).gather(1, gpu * self.num_logical + self.phy2log)
        return ~had

    def delta(self, previous: ExpertMapping, gpu: int) -> list[list[int]]:
        """Per layer, the physical slots on `gpu` whose expert it did not hold in `previous`.

        These are the slots a worker must fetch after moving from `previous` to this
        mapping (see `new_slots` for the set semantics).
        """
        slots = self.gpu_slots(gpu)
        fresh = self.new_slots(previous)[:, slots.start : slots.stop]
        return [[slots.start + int(i) for i in row.nonzero().flatten()] for row in fresh]

    def _check_gpu(self, gpu: int) -> None:
        if not 0 <= gpu < self.topology.num_gpus:
            raise InvalidRequestError(f"gpu {gpu} >= num_gpus {self.topology.num_gpus}")

    def check_comparable(self, previous: ExpertMapping) -> None:
        """Raise InvalidRequestError unless `previous` has the same layers, experts, slots and GPUs."""
        mine = (self.num_layers, self.num_logical, self.num_physical, self.topology.num_gpus)
        theirs = (previous.num_layers, previous.num_logical, previous.num_physical, previous.topology.num_gpus)
        if mine != theirs:
            raise InvalidRequestError(
                f"mappings differ in (layers, logical, physical, gpus): {theirs} (previous) vs {mine} (this one)"
            )
