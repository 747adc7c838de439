"""No expansion on load: a torch pickle's views are bounded by their storage and by the file.

A stride-0 view of 4 bytes can claim 2**28 elements; copying it out (the loader must, for
a non-contiguous tensor) would turn a 1.6 KB file into 1 GiB of memory. These files are
refused with DATA_LOSS before anything is copied, in the zip and the legacy format alike,
while a real strided tensor (a transposed slice of a real storage) still loads bit for bit.
"""

from __future__ import annotations

import collections
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weightserve.errors import CorruptCheckpointError
from weightserve.loaders.torch_pickle import TorchLoader
from weightserve.loaders.torch_views import View, check_views, view_extent

MiB = 1024 * 1024
FORMATS = pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])


def save(tensors: dict[str, Any], path: Path, zip_format: bool) -> Path:
    torch.save(tensors, path, _use_new_zipfile_serialization=zip_format)
    return path


def peak_rss() -> int:
    """The process's peak resident set so far, in bytes (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def refused(path: Path, match: str) -> CorruptCheckpointError:
    with pytest.raises(CorruptCheckpointError, match=match) as info:
        TorchLoader([path])
    return info.value


class RawView:
    """Pickles as a tensor view (offset, size, stride) of `base`'s storage, unchecked.

    torch will not build a view past its storage, so a hostile file is written by hand:
    this reduces to the same `_rebuild_tensor_v2` call torch.save writes for a tensor.
    """

    def __init__(self, base: torch.Tensor, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.base, self.offset, self.size, self.stride = base, offset, size, stride

    def __reduce_ex__(self, protocol: object) -> tuple[object, tuple[object, ...]]:
        storage = torch.storage.TypedStorage(
            wrap_storage=self.base.untyped_storage(), dtype=self.base.dtype, _internal=True
        )
        args = (storage, self.offset, self.size, self.stride, False, collections.OrderedDict())
        return torch._utils._rebuild_tensor_v2, args


# ------------------------------------------------------------------ stride-0 expand


@pytest.mark.fault("pickle whose views expand or overlap")
@FORMATS
def test_stride_zero_expand_of_4_bytes_to_1_gib_is_refused_without_growing_memory(
    tmp_path: Path, zip_format: bool
) -> None:
    path = save({"w": torch.zeros(1).expand(2**28)}, tmp_path / "expand.bin", zip_format)
    size = path.stat().st_size
    assert size < 2048  # 1.6 KB (zip) or 0.4 KB (legacy) that would become 1 GiB
    rss, peak = psutil.Process().memory_info().rss, peak_rss()

    error = refused(path, r"expand\.bin: tensor 'w' is a strided view of 268435456 elements \(1073741824 bytes\)")

    assert f"more than the file's {size} bytes" in str(error)
    assert "over a 4-byte storage" in str(error)
    # Materialising would have added 1 GiB to both; a few MB of slack for the allocator.
    assert psutil.Process().memory_info().rss - rss < 32 * MiB
    assert peak_rss() - peak < 32 * MiB


_CAPPED = """
import resource, sys
from pathlib import Path
from weightserve.errors import CorruptCheckpointError
from weightserve.loaders.torch_pickle import TorchLoader

with open("/proc/self/status") as status:
    vm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + 512 * 1024 * 1024, resource.RLIM_INFINITY))
try:
    TorchLoader([Path(sys.argv[1])])
    print("loaded")
except CorruptCheckpointError as e:
    print(f"refused: {e}")
"""


@pytest.mark.fault("pickle whose views expand or overlap")
@FORMATS
def test_the_8_gib_variant_is_refused_too(tmp_path: Path, zip_format: bool) -> None:
    # Before the check this one was OOM-killed. In a child whose address space is capped
    # at what it has plus 512 MiB, so a regression fails this test instead of the host.
    path = save({"w": torch.zeros(1).expand(2**31)}, tmp_path / "expand8.bin", zip_format)
    result = subprocess.run(
        [sys.executable, "-c", _CAPPED, str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(
        "refused: expand8.bin: tensor 'w' is a strided view of 2147483648 elements (8589934592 bytes)"
    ), result.stdout


@pytest.mark.fault("pickle whose views expand or overlap")
def test_expanded_views_of_a_nested_state_dict_name_the_tensor(tmp_path: Path) -> None:
    state = {"state_dict": {"layer": {"bias": torch.zeros(1, 4).expand(2**20, 4), "weight": torch.ones(3)}}}
    path = save(state, tmp_path / "nested.pt", True)
    refused(path, r"tensor 'layer\.bias' is a strided view of 4194304 elements")


# ---------------------------------------------------------- overlapping as_strided


@pytest.mark.fault("pickle whose views expand or overlap")
@FORMATS
def test_overlapping_as_strided_view_that_would_expand_is_refused(tmp_path: Path, zip_format: bool) -> None:
    # Inside its 1024-element storage (extent 999 + 24 + 1 = 1024), but 25,000 overlapping
    # elements: 100 KB to hold for a file of about 5 KB.
    base = torch.arange(1024, dtype=torch.float32)
    view = torch.as_strided(base, (1000, 25), (1, 1))
    path = save({"w": view}, tmp_path / "overlap.bin", zip_format)

    error = refused(path, r"tensor 'w' is a strided view of 25000 elements \(100000 bytes\) over a 4096-byte storage")

    assert f"more than the file's {path.stat().st_size} bytes" in str(error)


def test_strided_views_are_summed_over_the_file(tmp_path: Path) -> None:
    # Each transpose alone (4 KB) is smaller than the file; three of them are not.
    base = torch.arange(1024, dtype=torch.float32).reshape(32, 32)
    path = save({"a": base.t(), "b": base.t(), "c": base.t()}, tmp_path / "three.bin", True)
    assert 4096 < path.stat().st_size < 8192

    refused(path, r"tensor 'b' is a strided view of 1024 elements \(4096 bytes\) .* would hold 8192 bytes in memory")


@pytest.mark.fault("pickle whose views expand or overlap")
@FORMATS
@pytest.mark.parametrize(
    ("offset", "size", "stride"),
    [(0, (2**28,), (1,)), (2, (4,), (1,)), (0, (3, 3), (2, 1)), (5, (1,), (1,))],
    ids=["huge", "offset", "2d", "past-end"],
)
def test_view_reaching_past_its_storage_is_refused(
    tmp_path: Path, zip_format: bool, offset: int, size: tuple[int, ...], stride: tuple[int, ...]
) -> None:
    # torch refuses these itself (its storages cannot grow under a mapping, nor past
    # the size a legacy file records); check_views would name them if it did not.
    path = save(
        {"w": RawView(torch.arange(4, dtype=torch.float32), offset, size, stride)}, tmp_path / "past.bin", zip_format
    )
    rss = psutil.Process().memory_info().rss

    refused(path, r"past\.bin: ")

    assert psutil.Process().memory_info().rss - rss < 32 * MiB


# ------------------------------------------------------------ what still loads


@FORMATS
def test_transposed_slice_of_a_real_storage_loads_bit_identically(tmp_path: Path, zip_format: bool) -> None:
    base = torch.arange(64 * 48, dtype=torch.float32).reshape(64, 48)
    tensors = {
        "slice_t": base[8:40, 4:20].t(),  # non-contiguous, 2 KB of a 12 KB storage
        "expanded_row": torch.arange(8, dtype=torch.int16).reshape(1, 8).expand(4, 8),  # 64 B of 16
        "plain": torch.arange(10, dtype=torch.bfloat16),
        "empty_far": torch.arange(4.0)[4:],  # empty, at the end of its storage
    }
    path = save(tensors, tmp_path / "legit.bin", zip_format)
    assert not tensors["slice_t"].is_contiguous()
    reference = torch.load(path, weights_only=True)

    with TorchLoader([path]) as loader:
        got = {}
        for record in loader.records:
            buf = bytearray(record.nbytes)
            loader.sources[record.source].read_into(record.offset, memoryview(buf))
            got[record.name] = (record.shape, bytes(buf))

    assert set(got) == set(tensors)
    for name, tensor in reference.items():
        shape, data = got[name]
        assert shape == tuple(tensor.shape)
        assert data == tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), name


# ------------------------------------------------------------- the pure rules


def view(shape: tuple[int, ...], stride: tuple[int, ...], offset: int = 0, storage: int = 16, **kw: Any) -> View:
    fields: dict[str, Any] = {"itemsize": 4, "contiguous": False, **kw}
    return View("t", offset, shape, stride, fields["itemsize"], storage * fields["itemsize"], fields["contiguous"])


def test_view_extent_examples() -> None:
    assert view_extent(0, (2, 3), (1, 2)) == 6
    assert view_extent(3, (4,), (0,)) == 4
    assert view_extent(7, (0, 5), (5, 1)) == 0
    assert view_extent(0, (), ()) == 1


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (view((4,), (6,)), r"needs 19 elements of its storage, which holds 16"),
        (view((4,), (1,), offset=13), r"offset 13\) needs 17 elements"),
        (view((2,), (-1,), offset=3), r"may not start before its storage"),
        (view((2,), (1,), offset=-1), r"may not start before its storage"),
        (view((2, 2), (1,)), r"has shape \[2, 2\] and stride \[1\]"),
        (view((-1,), (1,)), r"has shape \[-1\]"),
    ],
)
def test_check_views_refusals(bad: View, match: str) -> None:
    with pytest.raises(CorruptCheckpointError, match=rf"f\.bin: tensor 't' .*{match}"):
        check_views("f.bin", [bad], 10**6)


def test_contiguous_views_cost_nothing_and_empty_views_may_sit_anywhere() -> None:
    check_views("f.bin", [view((16,), (1,), contiguous=True), view((0,), (1,), offset=99)], 0)


@settings(max_examples=300, deadline=None)
@given(
    shape=st.lists(st.integers(min_value=0, max_value=6), max_size=4),
    data=st.data(),
    storage=st.integers(min_value=0, max_value=64),
)
def test_check_views_agrees_with_torch_on_what_fits(shape: list[int], data: st.DataObject, storage: int) -> None:
    stride = data.draw(st.lists(st.integers(min_value=0, max_value=20), min_size=len(shape), max_size=len(shape)))
    offset = data.draw(st.integers(min_value=0, max_value=80))
    try:
        torch.empty(storage).as_strided(shape, stride, offset)
        fits = True
    except RuntimeError:
        fits = False
    try:
        check_views("f.bin", [view(tuple(shape), tuple(stride), offset, storage)], 2**40)
        ours = True
    except CorruptCheckpointError:
        ours = False
    assert ours == fits


# ------------------------------------------------- the pickle's own structure


def legacy_file(path: Path, pickled: bytes) -> Path:
    """A legacy torch file whose object is the raw pickle `pickled` (and no storages)."""
    import pickle

    import torch.serialization as ts

    with path.open("wb") as f:
        pickle.dump(ts.MAGIC_NUMBER, f, protocol=2)
        pickle.dump(ts.PROTOCOL_VERSION, f, protocol=2)
        sys_info = {"protocol_version": ts.PROTOCOL_VERSION, "little_endian": True, "type_sizes": {}}
        pickle.dump(sys_info, f, protocol=2)
        f.write(pickled)
        pickle.dump([], f, protocol=2)
    return path


def key(name: bytes) -> bytes:
    return b"X" + len(name).to_bytes(4, "little") + name


@pytest.mark.fault("pickle whose views expand or overlap")
def test_dicts_nested_past_the_recursion_limit_are_corrupt_not_a_crash(tmp_path: Path) -> None:
    depth = 5000  # Python's recursion limit is 1000
    pickled = b"\x80\x02}" + (key(b"a") + b"}") * depth + b"s" * depth + b"."
    refused(legacy_file(tmp_path / "deep.bin", pickled), r"deep\.bin: dicts nested more than 64 deep")


@pytest.mark.fault("pickle whose views expand or overlap")
def test_a_dict_reached_by_2_to_the_60_paths_is_refused_at_once(tmp_path: Path) -> None:
    # x0 = {}; x[i] = {"a": x[i-1], "b": x[i-1]}: 60 dicts in the file, 2**60 paths to x0.
    pickled = b"\x80\x02}q\x00"
    for i in range(1, 61):
        get = b"h" + bytes([i - 1])
        pickled += b"}" + key(b"a") + get + b"s" + key(b"b") + get + b"s" + b"q" + bytes([i])
    refused(legacy_file(tmp_path / "dag.bin", pickled + b"."), r"dag\.bin: the dict at '(a\.)+b' is reached twice")


@pytest.mark.fault("pickle whose views expand or overlap")
def test_a_dict_that_holds_itself_is_refused(tmp_path: Path) -> None:
    pickled = b"\x80\x02}q\x00" + key(b"self") + b"h\x00s."
    refused(legacy_file(tmp_path / "cycle.bin", pickled), r"the dict at 'self' is reached twice")


def test_nesting_a_few_levels_deep_still_flattens(tmp_path: Path) -> None:
    state = {"model": {"encoder": {"layer": {"0": {"w": torch.arange(3.0)}}}, "head": torch.ones(2)}}
    path = save(state, tmp_path / "nested.bin", True)
    with TorchLoader([path]) as loader:
        assert [r.name for r in loader.records] == ["encoder.layer.0.w", "head"]
