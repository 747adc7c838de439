"""benchmarks/peers.py writes the README's peer table: its short run, on a tiny checkpoint, fills the marked block."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

PEERS = Path(__file__).resolve().parents[2] / "benchmarks" / "peers.py"

pytestmark = pytest.mark.timeout(120)


def load_peers() -> ModuleType:
    sys.path.insert(0, str(PEERS.parent))
    spec = importlib.util.spec_from_file_location("peers_under_test", PEERS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_short_run_writes_the_table_between_the_markers(tmp_path: Path) -> None:
    peers = load_peers()
    readme = tmp_path / "README.md"
    head, tail = "# Title\n\nBefore the table.\n\n", "\n\n## Next\n\nAfter the table.\n"
    readme.write_text(f"{head}{peers.BEGIN}\nstale row\n{peers.END}{tail}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSERVE_")}
    env["WEIGHTSERVE_BENCH_DIR"] = str(tmp_path / "bench")
    run = subprocess.run(
        [sys.executable, str(PEERS), "--short", "--repeat", "1", "--readme", str(readme)],
        capture_output=True,
        text=True,
        env=env,
        timeout=110,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr

    text = readme.read_text()
    assert text.startswith(head + peers.BEGIN) and text.endswith(peers.END + tail)
    assert "stale row" not in text
    block = text[text.index(peers.BEGIN) : text.index(peers.END)]
    assert "cores" in block and "GiB RAM" in block and "torch" in block  # the machine is described
    rows = {cells(line)[0]: cells(line) for line in block.splitlines() if line.startswith("| ") and "---" not in line}
    header = rows.pop("contender")
    assert header[-2:] == ["weightserve gRPC ÷ it", "weightserve shm ÷ it"]
    labels = {c.label: c for c in peers.CONTENDERS if c.key != "ws-tcp-before"}
    assert set(rows) == set(labels)
    for label, row in rows.items():
        if labels[label].in_process:
            warm, _cold, cpu, rss, by_grpc, by_shm = row[1:]
            assert float(warm) > 0 and float(cpu) > 0 and float(rss) > 0, row
            assert float(by_grpc) > 0 and float(by_shm) > 0, row
        else:
            assert row[1].startswith("skipped: --short"), row
    assert rows["weightserve gRPC, TCP"][5] == "1.00"  # each ratio is against its own reference
    assert rows["weightserve shared memory, views"][6] == "1.00"
    # the printed table is the written one
    assert "\n".join(line for line in block.splitlines() if line.startswith("|")) in run.stdout


def test_rewriting_replaces_the_block_and_refuses_a_file_without_one(tmp_path: Path) -> None:
    peers = load_peers()
    readme = tmp_path / "README.md"
    readme.write_text(f"top\n{peers.BEGIN}\nold\n{peers.END}\nbottom\n")
    peers.write_readme(readme, ["| a | 1 |"], "python benchmarks/peers.py --readme")
    peers.write_readme(readme, ["| b | 2 |"], "python benchmarks/peers.py --readme")
    text = readme.read_text()
    assert text.count(peers.BEGIN) == 1 and text.count(peers.END) == 1
    assert "| b | 2 |" in text and "| a | 1 |" not in text and "old" not in text
    assert re.search(r"<!-- written by `python benchmarks/peers.py --readme`", text)
    assert text.startswith("top\n") and text.endswith("\nbottom\n")

    (tmp_path / "bare.md").write_text("no markers\n")
    with pytest.raises(SystemExit, match="needs exactly one"):
        peers.write_readme(tmp_path / "bare.md", ["| a |"], "cmd")


def test_the_nginx_contender_serves_the_files_whole_and_by_range(tmp_path: Path) -> None:
    """tensorizer-over-HTTP reads from this nginx: whole files and byte ranges must come back exact."""
    peers = load_peers()
    if peers.nginx_binary() is None:
        pytest.skip("nginx is not installed (make test installs it as root with apt-get)")
    import urllib.request

    payload = os.urandom(3 << 20)
    (tmp_path / "model.tensors").write_bytes(payload)
    with peers.nginx_serving(tmp_path) as url:
        with urllib.request.urlopen(f"{url}/model.tensors", timeout=10) as response:
            assert response.read() == payload
        ranged = urllib.request.Request(f"{url}/model.tensors", headers={"Range": "bytes=1000-1048575"})
        with urllib.request.urlopen(ranged, timeout=10) as response:
            assert response.status == 206 and response.read() == payload[1000:1048576]
