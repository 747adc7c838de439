"""Checking that a manifest's expert tensors are exactly the slots its placement says it sends.

An expert-parallel manifest carries two descriptions of one thing: the tensors to send
(named by local slot, or stacked per layer in vLLM's layout) and the placement
(`experts.layers[i].sent_slots`). A server that paired a plan with another placement
would hand the worker experts in the wrong slots without any checksum failing, so the
client refuses a manifest whose two halves disagree, before a byte is fetched.
"""

from __future__ import annotations

import re

import grpc

from weightserve.errors import FetchError
from weightserve.v1 import weightserve_pb2 as pb

_PER_SLOT = re.compile(r"\blayers\.(?P<layer>\d+)\..*?\bexperts\.(?P<slot>\d+)\.")
_STACKED = re.compile(r"\blayers\.(?P<layer>\d+)\..*?\bexperts\.(?:w13_weight|w2_weight)$")


def check_expert_slots(manifest: pb.GetManifestResponse, model: str) -> None:
    """Raise DATA_LOSS unless the expert tensors cover exactly the placement's sent slots.

    Raises:
        FetchError: DATA_LOSS naming the first layer whose slots disagree.
    """
    if not manifest.HasField("experts"):
        return
    sent = {layer.layer: sorted(layer.sent_slots) for layer in manifest.experts.layers}
    per_slot: dict[int, set[int]] = {}
    for tensor in manifest.tensors:
        if match := _PER_SLOT.search(tensor.name):
            per_slot.setdefault(int(match["layer"]), set()).add(int(match["slot"]))
        elif (match := _STACKED.search(tensor.name)) and tensor.shape:
            layer = int(match["layer"])
            if tensor.shape[0] != len(sent.get(layer, [])):
                _fail(model, manifest, f"layer {layer} stacks {tensor.shape[0]} slots, sends {sent.get(layer, [])}")
            per_slot.setdefault(layer, set()).update(sent[layer])
    for layer in sorted(set(sent) | set(per_slot)):
        have, want = sorted(per_slot.get(layer, set())), sent.get(layer, [])
        if have != want:
            _fail(model, manifest, f"layer {layer} has tensors for slots {have}, the placement sends {want}")


def _fail(model: str, manifest: pb.GetManifestResponse, why: str) -> None:
    version = manifest.experts.mapping_version
    raise FetchError(
        f"fetch {model}: DATA_LOSS: manifest {manifest.manifest_id} disagrees with its expert placement "
        f"(mapping v{version}): {why}",
        grpc.StatusCode.DATA_LOSS,
    )
