"""Which model each request names, for the token's model globs: one entry per request type.

The token check (server/auth.py) must see the model of every request that names one,
whatever the field is called: FillReplica names it inside its disk-cache `key`, and a
check keyed on a field name once let such a request past every glob. So every request
type of every service has an entry here, and a request type without one is refused
(fail closed) until someone says where its model is; tests/server/test_request_models.py
checks the table against the proto's services.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from weightserve.server.proto_convert import model_name
from weightserve.v1 import weightserve_pb2 as pb

ModelOf = Callable[[Any], str]


def _key_model(request: pb.FillReplicaRequest) -> str:
    """The model of a disk-cache key (`s3://bucket/prefix@etag-digest`): its part before the revision."""
    return model_name(request.key).partition("@")[0]


def _field(name: str) -> ModelOf:
    def model_of(request: Any) -> str:
        return model_name(getattr(request, name))

    return model_of


def _shard(request: Any) -> str:
    return model_name(request.shard.model)


MODEL_OF: dict[str, ModelOf | None] = {
    pb.ListModelsRequest.DESCRIPTOR.full_name: None,  # lists only the token's models
    pb.GetManifestRequest.DESCRIPTOR.full_name: _shard,
    pb.FetchShardRequest.DESCRIPTOR.full_name: _shard,
    pb.FetchShardSegmentsRequest.DESCRIPTOR.full_name: _shard,
    pb.FetchFilesRequest.DESCRIPTOR.full_name: _field("model"),
    pb.PrefetchRequest.DESCRIPTOR.full_name: _field("model"),
    pb.EvictRequest.DESCRIPTOR.full_name: _field("model"),
    pb.StartPublishRequest.DESCRIPTOR.full_name: _field("model"),
    pb.PublishVersionRequest.DESCRIPTOR.full_name: None,  # names an upload; the servicer checks its model
    pb.GetPublishRequest.DESCRIPTOR.full_name: None,  # names an upload; the servicer checks its model
    pb.ListVersionsRequest.DESCRIPTOR.full_name: _field("model"),
    pb.WatchVersionsRequest.DESCRIPTOR.full_name: _field("model"),
    pb.ReportExpertLoadRequest.DESCRIPTOR.full_name: _field("model"),
    pb.RebalanceRequest.DESCRIPTOR.full_name: _field("model"),
    pb.GetRebalanceRequest.DESCRIPTOR.full_name: None,  # names a job; the servicer checks the job's model
    pb.WatchExpertMappingRequest.DESCRIPTOR.full_name: _field("model"),
    pb.FillReplicaRequest.DESCRIPTOR.full_name: _key_model,
}
"""Request type (full proto name) -> the canonical model it names, or None when it names
none (the servicer then checks what the request leads to, as GetRebalance does)."""


class UncheckedRequestError(LookupError):
    """A request type MODEL_OF does not list: refused, since its model would go unchecked."""


def model_of(request: Any) -> str:
    """The canonical model `request` names; '' when its type names none.

    Raises:
        InvalidRequestError: the name is malformed (over a limit, unprintable).
        UncheckedRequestError: MODEL_OF has no entry for the request's type.
    """
    full_name = request.DESCRIPTOR.full_name
    try:
        extract = MODEL_OF[full_name]
    except KeyError:
        raise UncheckedRequestError(f"{full_name} has no entry in MODEL_OF, so its model cannot be checked") from None
    return extract(request) if extract is not None else ""
