"""What the serving layers report as they work, behind one small interface they own.

The cache, the data plane and the control plane call a Recorder; the server plugs in
the Prometheus one (server/metrics.py), and everything else gets this base class, whose
methods do nothing. Keeping the interface here (stdlib only) is what lets the layers
below the server record without importing prometheus_client.

A recorder must never raise into the serving path: the Prometheus implementation
catches and logs its own errors, and every method here is cheap enough to call per
chunk.
"""

from __future__ import annotations


class Recorder:
    """Events of a serving process. Every method is a no-op here; see server/metrics.py."""

    # --------------------------------------------------------------- gRPC calls

    def rpc_started(self, service: str, method: str, kind: str) -> None:
        """A call began. `kind` is unary or server_stream."""

    def rpc_handled(self, service: str, method: str, kind: str, code: str, seconds: float) -> None:
        """A call ended with status `code` (OK, NOT_FOUND, CANCELLED, ...) after `seconds`."""

    def rpc_message_sent(self, service: str, method: str, kind: str) -> None:
        """A call sent one response message."""

    def auth_refused(self, reason: str) -> None:
        """A call was refused by the token check: missing_token, unknown_token, scope or model."""

    # -------------------------------------------------------------- data plane

    def stream_started(self, model: str, layout: str, resumed: bool) -> None:
        """A FetchShard stream began (`resumed`: it asked for a resume point)."""

    def first_chunk(self, model: str, seconds: float) -> None:
        """A stream sent its first chunk `seconds` after its call began (opening the model included)."""

    def bytes_sent(self, model: str, layout: str, nbytes: int) -> None:
        """A stream sent a message of `nbytes` (counted as it goes, so throughput is a line, not a step)."""

    def stream_finished(self, model: str, layout: str, nbytes: int, seconds: float) -> None:
        """A stream ended (whole or not) having sent `nbytes` of messages, `seconds` after its call began."""

    def segments_granted(self, model: str, layout: str, nbytes: int) -> None:
        """A FetchShardSegments call granted `nbytes` of tensors in shared memory."""

    def bytes_read(self, source: str, nbytes: int) -> None:
        """Payload bytes a stream took from `source`: local, hf, s3, dummy, or cache."""

    # ------------------------------------------------------------------- cache

    def cache_lookup(self, hit: bool) -> None:
        """A chunk was found in memory (hit) or had to be read (miss)."""

    def single_flight_wait(self) -> None:
        """A request waited for a load or a read another request had started."""

    def cache_eviction(self, nbytes: int) -> None:
        """Cached chunks were dropped to make room."""

    def model_loaded(self, source: str, nbytes: int, seconds: float) -> None:
        """A model revision was opened (downloaded first, for a remote source)."""

    def budget_refusal(self) -> None:
        """A stream was refused for want of memory (RESOURCE_EXHAUSTED)."""

    # ---------------------------------------------------------------- control

    def load_report(self, model: str) -> None:
        """An expert load report was counted."""

    def rebalance_started(self, model: str, policy: str) -> None:
        """A rebalance job began."""

    def rebalance_finished(
        self,
        model: str,
        policy: str,
        outcome: str,
        seconds: float,
        before: float,
        after: float,
        locality: tuple[float, float] = (0.0, 0.0),
        dispatch: tuple[float, float] = (0.0, 0.0),
        bound: float = 0.0,
    ) -> None:
        """A rebalance job ended (`outcome`: succeeded or failed) with these figures.

        `before`/`after` are balancedness; `locality` and `dispatch` are group locality and
        estimated dispatch nodes per token, (before, after); `bound` is the best balancedness
        with every group on one node (0.0: groups cannot each sit on one node).
        """

    # ------------------------------------------------------------------ fleet

    def fleet_fill(self, source: str, nbytes: int) -> None:
        """Under --coordination, a remote model of `nbytes` entered this replica's disk cache from
        `source`: origin (downloaded here) or replica (copied from another replica)."""

    def fleet_uncoordinated(self) -> None:
        """Redis could not be reached: this replica downloads a model from its origin on its own."""

    def lease_waiting(self) -> None:
        """This replica began waiting for another replica's download of a model (once per model fill)."""

    def lease_waited(self, seconds: float) -> None:
        """A wait counted by `lease_waiting` ended after `seconds` (a copy was published or the lease lapsed)."""

    def lease_takeover(self) -> None:
        """This replica took a download lease after waiting on another holder that never published."""

    def lease_lost(self) -> None:
        """A download finished after its lease was lost: the copy serves this replica only."""

    def replica_fill_sent(self, nbytes: int) -> None:
        """FillReplica sent `nbytes` of file data to another replica (counted per message)."""


NULL_RECORDER = Recorder()
"""The recorder of a process that exports nothing (tests, tools)."""
