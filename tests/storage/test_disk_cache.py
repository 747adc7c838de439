"""The disk cache of remote models: atomic publication, LRU under a budget, what is never evicted."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from weightserve.atomic import atomic_write_bytes
from weightserve.errors import ResourceExhaustedError, UnavailableError
from weightserve.storage.disk_cache import UNFINISHED_SUFFIX, DiskCache, open_in_this_process, slug


def writer(size: int, name: str = "w.safetensors") -> Callable[[Path], None]:
    """A fill callback writing one file of `size` bytes."""

    def fill(directory: Path) -> None:
        atomic_write_bytes(directory / name, b"x" * size)

    return fill


def test_populate_publishes_complete_models_only(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)
    seen: list[Path | None] = []

    def fill(directory: Path) -> None:
        assert directory.parent.name.endswith(".partial")
        atomic_write_bytes(directory / "a.safetensors", b"a" * 10)
        seen.append(cache.lookup("k"))  # half-written: not served

    files = cache.populate("k", 10, fill)
    assert seen == [None]
    assert cache.lookup("k") == files and (files / "a.safetensors").read_bytes() == b"a" * 10
    assert [(e.key, e.bytes) for e in cache.entries()] == [("k", 10)]
    assert not list(tmp_path.glob("*.partial")) and not list(files.glob(".*"))


@pytest.mark.fault("remote download dropped or failing")
def test_a_failed_download_leaves_nothing(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)

    def fill(directory: Path) -> None:
        atomic_write_bytes(directory / "a.safetensors", b"a")
        raise ConnectionError("dropped")

    with pytest.raises(ConnectionError):
        cache.populate("k", 1, fill)
    assert cache.lookup("k") is None and cache.entries() == [] and not list(tmp_path.glob("*.partial"))
    assert cache.populate("k", 1, writer(1)).is_dir()  # and the next try starts clean


def test_least_recently_used_models_are_evicted_first(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, budget_bytes=300)
    now = time.time()
    for age, key in enumerate(("a", "b", "c")):
        cache.populate(key, 100, writer(100))
        os.utime(tmp_path / slug(key) / "entry.json", (now - 10 + age, now - 10 + age))  # used in this order
    os.utime(tmp_path / slug("a") / "entry.json", (now + 5, now + 5))  # then a again: a used last
    cache.populate("d", 150, writer(150))
    assert sorted(e.key for e in cache.entries()) == ["a", "d"]
    assert cache.used_bytes() <= 300 and not any((tmp_path / ".trash").iterdir())


def test_models_in_use_are_never_evicted(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, budget_bytes=200)
    files = cache.populate("a", 100, writer(100))
    cache.populate("b", 100, writer(100))
    with open(files / "w.safetensors", "rb"):  # a loader holds it open
        cache.populate("c", 100, writer(100))
        assert sorted(e.key for e in cache.entries()) == ["a", "c"]
        with pytest.raises(ResourceExhaustedError, match="in use"):
            cache.populate("d", 150, writer(150))
    assert cache.evict("a") and cache.lookup("a") is None


def test_a_model_being_downloaded_is_never_evicted_nor_downloaded_twice(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, budget_bytes=250)
    started, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def slow(directory: Path) -> None:
        calls.append("slow")
        started.set()
        release.wait(10)
        atomic_write_bytes(directory / "w.safetensors", b"s" * 100)

    first = threading.Thread(target=cache.populate, args=("slow", 100, slow))
    first.start()
    started.wait(10)
    waiter = threading.Thread(target=cache.populate, args=("slow", 100, slow))  # a second request for it
    waiter.start()
    with pytest.raises(ResourceExhaustedError):  # the 100 reserved bytes stay reserved
        cache.populate("big", 200, writer(200))
    assert list(tmp_path.glob("*.partial"))  # and the download in progress is untouched
    release.set()
    first.join(10)
    waiter.join(10)
    assert calls == ["slow"] and [e.key for e in cache.entries()] == ["slow"]


@pytest.mark.fault("model over the disk cache budget")
def test_a_model_over_the_whole_budget_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ResourceExhaustedError, match="--disk-cache-bytes"):
        DiskCache(tmp_path, budget_bytes=10).populate("k", 11, writer(11))


@pytest.mark.fault("remote download dropped or failing", cases=2)
@pytest.mark.parametrize("suffix", [".partial", ".7.partial"], ids=["plain", "fleet-token"])
def test_a_crashed_download_is_cleaned_up(tmp_path: Path, suffix: str) -> None:
    cache = DiskCache(tmp_path)
    stale = tmp_path / f"{slug('old')}{suffix}" / "files"
    stale.mkdir(parents=True)
    (stale / "half.safetensors").write_bytes(b"half")
    cache.populate("new", 1, writer(1))
    assert not stale.exists() and cache.lookup("old") is None


@pytest.mark.parametrize("token", [0, 3], ids=["plain", "fleet-token"])
def test_another_models_populate_leaves_a_live_download_alone(tmp_path: Path, token: int) -> None:
    """Fleet downloads and peer fills write into `<slug>.<token>.partial` under the lock `<slug>.lock`."""
    cache = DiskCache(tmp_path, budget_bytes=1000)
    started, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def slow(directory: Path) -> None:
        atomic_write_bytes(directory / "a.safetensors", b"a" * 50)
        started.set()
        release.wait(10)
        atomic_write_bytes(directory / "b.safetensors", b"b" * 50)

    def download() -> None:
        try:
            cache.populate_here("s3://b/a@1", 100, slow, token)
        except BaseException as e:  # reported by the assertion below
            errors.append(e)

    first = threading.Thread(target=download)
    first.start()
    assert started.wait(10)
    live = list(tmp_path.glob("*.partial"))
    cache.populate("s3://b/b@2", 100, writer(100))
    cache.populate_here("s3://b/c@3", 100, writer(100), token + 1)
    assert list(tmp_path.glob("*.partial")) == live, "another model's populate removed a live download"
    release.set()
    first.join(10)
    assert not errors
    assert sorted(e.key for e in cache.entries()) == ["s3://b/a@1", "s3://b/b@2", "s3://b/c@3"]


def _populate_in_child(root: str, log: str, arrived: Any) -> None:
    def fill(directory: Path) -> None:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        # both processes have reached populate (the other now waits for the lock) before this download ends
        for _ in range(2):
            assert arrived.acquire(timeout=30)
        atomic_write_bytes(directory / "w.safetensors", b"w" * 10)

    arrived.release()
    DiskCache(Path(root)).populate("shared", 10, fill)


def test_processes_sharing_a_volume_download_once(tmp_path: Path) -> None:
    # forked, not spawned: a fresh interpreter would spend seconds importing torch
    ctx = multiprocessing.get_context("fork")
    log = tmp_path / "fills.log"
    arrived = ctx.Semaphore(0)
    args = (str(tmp_path / "cache"), str(log), arrived)
    procs = [ctx.Process(target=_populate_in_child, args=args) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(log.read_text().split()) == 1
    assert [e.key for e in DiskCache(tmp_path / "cache").entries()] == ["shared"]


def test_open_in_this_process(tmp_path: Path) -> None:
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "f").write_bytes(b"")
    (tmp_path / "m2").mkdir()
    with open(tmp_path / "m" / "f", "rb"):
        assert open_in_this_process(tmp_path / "m")
        assert not open_in_this_process(tmp_path / "m2")
    assert not open_in_this_process(tmp_path / "m")


def test_slugs_are_readable_and_distinct() -> None:
    assert slug("s3://bucket/prefix/model@s3-abc").startswith("s3--bucket--prefix--model--s3-abc-")
    assert slug("a/b") != slug("a--b")


def test_a_fleet_download_writes_into_a_directory_named_by_its_lease_token(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)
    stale = tmp_path / f"{slug('k')}.6.partial" / "files"  # a dead leaseholder's leftovers
    stale.mkdir(parents=True)
    seen: list[str] = []

    def fill(directory: Path) -> None:
        seen.append(directory.parent.name)
        atomic_write_bytes(directory / "a.safetensors", b"a" * 10)

    files = cache.populate_here("k", 10, fill, token=7)
    assert seen == [f"{slug('k')}.7.partial"]
    assert cache.published_files("k") == (files, ["a.safetensors"], 7)
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.fault("remote download dropped or failing")
def test_a_fill_that_returns_with_an_unfinished_file_is_not_published(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)

    def fill(directory: Path) -> None:
        atomic_write_bytes(directory / "a.safetensors", b"a")
        (directory / f"b.safetensors{UNFINISHED_SUFFIX}").write_bytes(b"half")

    with pytest.raises(UnavailableError, match="unfinished"):
        cache.populate("k", 5, fill)
    assert cache.lookup("k") is None and not list(tmp_path.glob("*.partial"))


@pytest.mark.fault(
    "a cached model's file truncated, grown or deleted on disk",
    expect="the model is discarded and downloaded again, never served damaged",
)
@pytest.mark.parametrize("damage", ["truncated", "grown", "deleted"])
def test_a_damaged_model_is_downloaded_again(tmp_path: Path, damage: str) -> None:
    cache = DiskCache(tmp_path)
    fills: list[Path] = []

    def fill(directory: Path) -> None:
        fills.append(directory)
        atomic_write_bytes(directory / "w.safetensors", b"x" * 100)
        (directory / "sub").mkdir()
        atomic_write_bytes(directory / "sub" / "config.json", b"{}")

    files = cache.populate("k", 102, fill)
    weights = files / "w.safetensors"
    if damage == "truncated":
        os.truncate(weights, 40)
    elif damage == "grown":
        with weights.open("ab") as f:
            f.write(b"y")
    else:
        weights.unlink()
    assert cache.lookup("k") is None  # never handed out damaged
    again = cache.populate("k", 102, fill)
    assert len(fills) == 2 and (again / "w.safetensors").read_bytes() == b"x" * 100
    assert cache.lookup("k") == again and [(e.key, e.bytes) for e in cache.entries()] == [("k", 102)]
    assert not [p for p in (tmp_path / ".trash").iterdir()]


def test_a_marker_without_sizes_is_still_served(tmp_path: Path) -> None:
    """Models published before sizes were recorded keep being served (they are not judged)."""
    cache = DiskCache(tmp_path)
    files = cache.populate("k", 10, writer(10))
    marker = files.parent / "entry.json"
    meta = json.loads(marker.read_text())
    del meta["sizes"]
    marker.write_text(json.dumps(meta))
    os.truncate(files / "w.safetensors", 3)
    assert cache.lookup("k") == files
