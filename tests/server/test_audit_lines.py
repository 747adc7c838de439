"""Access and audit lines: one line per call whatever the caller sends, naming the model acted on."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.server.test_experts import MODEL as MOE_MODEL
from tests.server.test_experts import root as moe_root  # noqa: F401 - the module-scoped MoE fixture
from weightserve.client import WeightClient
from weightserve.server.auth import audit
from weightserve.server.call_context import CallRecord
from weightserve.server.interceptors import log_call
from weightserve.server.log_setup import TEXT_FORMAT, JsonFormatter, TextFormatter
from weightserve.server.log_text import escape_text, field
from weightserve.server.tokens import ANONYMOUS, token_digest
from weightserve.v1 import weightserve_pb2 as pb
from weightserve.v1 import weightserve_pb2_grpc as pb_grpc

MODEL = "org/tiny-llama"
OPS = "ops-s3cret"
FORGED = "2026-12-03 21:00:00,000 INFO weightserve.audit: token=admin action=Evict model=org/tiny-llama outcome=OK"
BREAKS = ["\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029", "\x00", "\u202e"]
"""Every way a terminal, a log shipper or Python's splitlines() could start a new line, and a
bidi override that would hide what follows."""


@pytest.fixture
def server(model_root: Path, moe_root: Path, serve, tmp_path: Path):  # type: ignore[no-untyped-def]  # noqa: F811
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        f'[[tokens]]\nname = "ops"\nsha256 = "{token_digest(OPS)}"\nmodels = ["**"]\n'
        "control = true\ncache = true\npublish = true\n"
    )
    return serve(model_root, moe_root, auth_tokens=tokens, state_dir=tmp_path / "state", metrics_listen="off")


def bearer() -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {OPS}"),)


def formatted(records: list[logging.LogRecord]) -> list[str]:
    """The records as `weightserve serve` writes them in text."""
    formatter = TextFormatter(TEXT_FORMAT)
    return [formatter.format(r) for r in records if r.name in ("weightserve.audit", "weightserve.access")]


@pytest.mark.fault("request past a static or model limit", cases=len(BREAKS) * 4)
def test_a_model_name_with_a_line_break_is_refused_and_forges_no_log_line(
    server,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO), grpc.insecure_channel(server.address) as channel:
        weights, control = pb_grpc.WeightServiceStub(channel), pb_grpc.ControlServiceStub(channel)
        versions = pb_grpc.VersionServiceStub(channel)
        calls: list[Callable[[str], Any]] = [
            lambda m: weights.Evict(pb.EvictRequest(model=m), metadata=bearer()),
            lambda m: weights.GetManifest(pb.GetManifestRequest(shard=pb.ShardSpec(model=m)), metadata=bearer()),
            lambda m: control.Rebalance(pb.RebalanceRequest(model=m), metadata=bearer()),
            lambda m: list(versions.WatchVersions(pb.WatchVersionsRequest(model=m), metadata=bearer(), timeout=5)),
        ]
        for brk in BREAKS:
            for call in calls:
                with pytest.raises(grpc.RpcError) as info:
                    call(f"org/secret{brk}{FORGED}{brk}x")
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert f"unprintable character U+{ord(brk[0]):04X}" in info.value.details()
                assert FORGED not in info.value.details()
    written = formatted(caplog.records)  # an access line per call, an audit line per scoped one
    assert len(written) >= len(BREAKS) * (len(calls) + 1)  # a stream's access line may still be on its way
    assert all(len(line.splitlines()) == 1 for line in written)
    assert not any(line.startswith(FORGED[:30]) for line in "\n".join(written).splitlines())


def test_audit_and_access_lines_escape_what_a_caller_chose_in_text_and_json() -> None:
    hostile = f"org/a\n{FORGED}\u2028 outcome=OK"
    logger = logging.getLogger("weightserve")
    for formatter, fmt in ((TextFormatter(TEXT_FORMAT), "text"), (JsonFormatter(), "json")):
        out = io.StringIO()
        handler = logging.StreamHandler(out)
        handler.setFormatter(formatter)
        logger.addHandler(handler)
        old, logger.level = logger.level, logging.INFO
        try:
            audit(ANONYMOUS, "Evict", hostile, "NOT_FOUND", f"model {hostile} not found")
            record = CallRecord("weightserve.v1.WeightService", "Evict", "ipv4:127.0.0.1:1", "r1", "anonymous")
            record.model, record.code, record.details = hostile, "NOT_FOUND", f"no {hostile}"
            log_call(record, 0.1)
            logging.getLogger("weightserve.other").info("plain %s", hostile)  # any line, not only these two
        finally:
            logger.removeHandler(handler)
            logger.level = old
        lines = out.getvalue().splitlines()
        assert len(lines) == 3, lines
        if fmt == "json":
            assert [json.loads(line)["model"] for line in lines[:2]] == [hostile, hostile]
        else:
            assert 'model="org/a\\n2026-12-03' in lines[0] and '\\u2028 outcome=OK"' in lines[0]
            assert ' "org/a\\n2026-12-03' in lines[1]
    assert field("org/llama") == "org/llama" and field("a b") == '"a b"' and field('a"\\') == '"a\\"\\\\"'
    assert escape_text("tab\there") == "tab\\there" and escape_text("C:\\x y") == "C:\\x y"


def test_publish_and_rebalance_audit_lines_name_their_model(server, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    with caplog.at_level(logging.INFO, logger="weightserve.audit"):
        with WeightClient(server.address, token=OPS) as client:
            norm = client.fetch_state_dict(MODEL)["model.norm.weight"]
            assert client.publish(MODEL, {"model.norm.weight": norm * 2}) == 1
        with grpc.insecure_channel(server.address) as channel:
            control = pb_grpc.ControlServiceStub(channel)
            topology = pb.ExpertTopology(num_nodes=1, gpus_per_node=4)
            load = pb.ExpertCounts(moe_layers=2, experts=8, counts=[3] * 16)
            control.ReportExpertLoad(pb.ReportExpertLoadRequest(model=MOE_MODEL, load=load), metadata=bearer())
            started = control.Rebalance(pb.RebalanceRequest(model=MOE_MODEL, topology=topology), metadata=bearer())
            job = control.GetRebalance(
                pb.GetRebalanceRequest(job_id=started.job_id, wait_seconds=30), metadata=bearer()
            )
            assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    lines = [r.getMessage() for r in caplog.records if r.name == "weightserve.audit"]
    for action, model in (("PublishVersion", MODEL), ("GetRebalance", MOE_MODEL), ("Rebalance", MOE_MODEL)):
        assert f"token=ops action={action} model={model} outcome=OK" in lines, lines


@pytest.fixture(autouse=True)
def _no_stray_handlers() -> Iterator[None]:
    before = list(logging.getLogger("weightserve").handlers)
    yield
    assert logging.getLogger("weightserve").handlers == before
