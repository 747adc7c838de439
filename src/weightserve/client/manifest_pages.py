"""GetManifest page by page, assembled into one response so the rest of the client sees one plan.

The client always pages: a plan of 100k tensors is larger than gRPC's default 4 MiB
message limit (and than this client's own receive limit). A server that predates paging
ignores the fields and answers with one whole response, which is then the only page.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import grpc

from weightserve import wire
from weightserve.errors import FetchError
from weightserve.v1 import weightserve_pb2 as pb

PAGE_SIZE = 10_000
"""Tensors asked for per page; the server sends fewer when they would not fit in its page bound (3 MiB)."""


class ManifestPages:
    """Decides, page after page, what to request and when the plan is whole.

    The model may change between two pages. The server then refuses the next page's
    token (FAILED_PRECONDITION), or, if it does not check tokens, answers with another
    manifest id. Either way the pages so far are dropped and the plan is read again
    from the first page, once; a second change is FAILED_PRECONDITION.

    Example (the sync client's loop):
        >>> pages = ManifestPages("org/x", shard)  # doctest: +SKIP
        >>> while (request := pages.next_request()) is not None:  # doctest: +SKIP
        ...     try:
        ...         pages.on_page(call(request))
        ...     except FetchError as e:
        ...         pages.on_error(e)
        >>> manifest = pages.result()  # doctest: +SKIP
    """

    RESTARTS = 1

    def __init__(self, model: str, shard: pb.ShardSpec) -> None:
        self.model = model
        self.shard = shard
        self.restarts = 0
        self.pages = 0
        self._manifest: pb.GetManifestResponse | None = None
        self._token = ""
        self._done = False

    def next_request(self) -> pb.GetManifestRequest | None:
        """The request for the next page, or None when the plan is whole."""
        if self._done:
            return None
        return pb.GetManifestRequest(shard=self.shard, page_size=PAGE_SIZE, page_token=self._token)

    def on_page(self, page: pb.GetManifestResponse) -> None:
        """Add a page's tensors to the plan."""
        self.pages += 1
        if self._manifest is None:
            self._manifest = page
        elif page.manifest_id != self._manifest.manifest_id:
            self._start_over(f"its manifest id went from {self._manifest.manifest_id} to {page.manifest_id}")
            return
        else:
            self._manifest.tensors.extend(page.tensors)
        if page.next_page_token and not page.tensors:
            raise FetchError(
                f"manifest of {self.model}: INTERNAL: the server sent an empty page that is not the last",
                grpc.StatusCode.INTERNAL,
            )
        self._token = page.next_page_token
        self._done = not self._token

    def on_error(self, error: FetchError) -> None:
        """Start over when a later page finds the model changed; re-raise anything else."""
        if error.code() != grpc.StatusCode.FAILED_PRECONDITION or not self._token:
            raise error
        self._start_over(str(error))

    def result(self) -> pb.GetManifestResponse:
        """The whole plan, as one unpaged GetManifestResponse."""
        assert self._done and self._manifest is not None, "result() before the last page"
        self._manifest.next_page_token = ""
        return self._manifest

    def _start_over(self, why: str) -> None:
        if self.restarts >= self.RESTARTS:
            raise FetchError(
                f"manifest of {self.model}: FAILED_PRECONDITION: the model changed while its manifest was read in "
                f"pages, {self.restarts + 1} times ({why}); try again once it is stable",
                grpc.StatusCode.FAILED_PRECONDITION,
            )
        self.restarts += 1
        self._manifest, self._token = None, ""


def check_plan(manifest: pb.GetManifestResponse, model: str) -> None:
    """Refuse a plan no honest server sends, before anything is allocated from it.

    Everything the gRPC path sizes comes from the plan: an unknown dtype, a negative
    dimension or an nbytes its shape disagrees with failed deep inside torch (or
    allocated whatever the server claimed). About 2 us a tensor, next to the tens a
    streamed tensor costs anyway; the shared-memory path checks the runs of its grant
    instead (placements.runs_of) and the names here with `check_unique_names`.

    Raises:
        FetchError: DATA_LOSS naming the first entry that is wrong.
    """
    total = sum(check_entry(info, model) for info in manifest.tensors)
    if manifest.total_bytes and manifest.total_bytes != total:
        raise plan_error(model, f"total_bytes {manifest.total_bytes} is not the sum of its tensors ({total})")
    check_unique_names([info.name for info in manifest.tensors], model)


def check_entry(info: pb.TensorInfo, model: str) -> int:
    """One tensor's dtype known, its dimensions not negative and its nbytes what they make; returns nbytes.

    Raises:
        FetchError: DATA_LOSS naming the tensor.
    """
    shape, size = info.shape, wire.DTYPE_SIZES.get(info.dtype)
    if size is None:
        raise plan_error(model, f"tensor {info.name!r} has an unknown dtype {info.dtype!r}")
    if math.prod(shape) * size != info.nbytes or (shape and min(shape) < 0):
        raise plan_error(
            model, f"tensor {info.name!r}: shape {list(shape)} of {info.dtype} disagrees with its {info.nbytes} bytes"
        )
    return int(info.nbytes)


def check_unique_names(names: Sequence[str], model: str) -> None:
    """Every tensor of the plan named, and named once (a name twice lost one tensor from the state dict).

    Raises:
        FetchError: DATA_LOSS naming a name listed twice.
    """
    unique = set(names)
    if "" in unique:
        raise plan_error(model, "a tensor without a name")
    if len(unique) != len(names):
        counts = Counter(names)
        twice = next(name for name in names if counts[name] > 1)
        raise plan_error(model, f"tensor {twice!r} is listed twice")


def plan_error(model: str, why: str) -> FetchError:
    """DATA_LOSS for a manifest that contradicts itself."""
    return FetchError(f"manifest of {model}: DATA_LOSS: {why}", grpc.StatusCode.DATA_LOSS)
