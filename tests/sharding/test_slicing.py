"""Tensor-parallel and pipeline slicing: every rank's slices gather back to the checkpoint.

The oracle here is written from the slicing rules of DESIGN.md, not from rules.py:
column-parallel tensors split on dim 0, row-parallel on dim 1, vocabulary tensors are
padded with zero rows to a multiple of 64 and split on dim 0, k/v heads replicate when
the world size exceeds them (rank r serves head r // (W / kv_heads)), fused forms split
per part. Gathering undoes exactly that and must give back each original, bit for bit.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.sharding import fixtures as fx
from weightserve.errors import InvalidRequestError
from weightserve.loaders.base import TensorRecord
from weightserve.loaders.pieces import ZEROS, read_range
from weightserve.loaders.sources import MemorySource, Source
from weightserve.sharding.model_config import ModelConfig
from weightserve.sharding.plan import plan_shard
from weightserve.sharding.slicing import even_range, kv_range, slice_ranges
from weightserve.sharding.spec import ShardSpec
from weightserve.sharding.stages import stage_layers
from weightserve.sharding.tensor_plan import TensorPlan

CHUNK = 1000
"""Read plans in chunks that do not line up with rows, as the server's chunked stream does."""

# --------------------------------------------------------------------------- oracle

ORACLE: tuple[tuple[str, str], ...] = (
    (r"(?:^|\.)(?:embed_tokens|lm_head)\.weight$", "vocab"),
    (r"\.q_proj\.(?:weight|bias)$", "q"),
    (r"\.[kv]_proj\.(?:weight|bias)$", "kv"),
    (r"\.qkv_proj\.weight$", "qkv"),
    (r"\.gate_up_proj\.weight$", "gate_up"),
    (r"\.(?:gate_proj|up_proj|w1|w3)\.weight$", "column"),
    (r"\.(?:o_proj|down_proj|w2)\.weight$", "row"),
    (r"norm\.weight$|\.gate\.weight$|\.shared_expert_gate\.weight$|rotary_emb\.inv_freq$", "replicated"),
)


def oracle_kind(name: str) -> str:
    for pattern, kind in ORACLE:
        if re.search(pattern, name):
            return kind
    raise AssertionError(f"the test oracle has no kind for {name!r}")


def padded(rows: int) -> int:
    return -(-rows // 64) * 64


def legal(cfg: ModelConfig, world_size: int) -> bool:
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    kv_ok = kv % world_size == 0 if world_size <= kv else world_size % kv == 0
    return heads % world_size == 0 and kv_ok


def gather_kv(parts: list[torch.Tensor], cfg: ModelConfig, world_size: int) -> torch.Tensor:
    kv, head_dim = cfg.num_key_value_heads, cfg.head_dim
    if world_size <= kv:
        return torch.cat(parts)
    replicas = world_size // kv
    for rank, part in enumerate(parts):
        assert part.shape[0] == head_dim, f"rank {rank} should hold one k/v head"
        first = parts[(rank // replicas) * replicas]
        assert torch.equal(part, first), f"rank {rank} should repeat head {rank // replicas}"
    return torch.cat(parts[::replicas])


def gather(
    kind: str, parts: list[torch.Tensor], original: torch.Tensor, cfg: ModelConfig, as_saved: bool = False
) -> torch.Tensor:
    """Undo the split of one tensor; asserts replicas agree and padding is zero.

    `as_saved`: world size 1, pp size 1, checkpoint layout, where nothing is padded.
    """
    world_size = len(parts)
    parts = [fx.bits(p) for p in parts]
    if as_saved:
        assert world_size == 1
        return parts[0]
    if kind == "replicated":
        for part in parts:
            assert torch.equal(part, fx.bits(original))
        return parts[0]
    if kind == "vocab":
        rows = original.shape[0]
        assert all(p.shape[0] == padded(rows) // world_size for p in parts)
        full = torch.cat(parts)
        assert not torch.any(full[rows:]), "vocabulary padding rows must be zero"
        return full[:rows]
    if kind in ("q", "column"):
        return torch.cat(parts, 0)
    if kind == "row":
        return torch.cat(parts, 1)
    if kind == "kv":
        return gather_kv(parts, cfg, world_size)
    if kind == "qkv":
        q_rows = cfg.num_attention_heads * cfg.head_dim // world_size
        kv_rows = max(cfg.num_key_value_heads // world_size, 1) * cfg.head_dim
        assert all(p.shape[0] == q_rows + 2 * kv_rows for p in parts)
        q = torch.cat([p[:q_rows] for p in parts])
        k = gather_kv([p[q_rows : q_rows + kv_rows] for p in parts], cfg, world_size)
        v = gather_kv([p[q_rows + kv_rows :] for p in parts], cfg, world_size)
        return torch.cat([q, k, v])
    if kind == "gate_up":
        half = parts[0].shape[0] // 2
        return torch.cat([torch.cat([p[:half] for p in parts]), torch.cat([p[half:] for p in parts])])
    raise AssertionError(kind)


def unfuse_vllm(
    state: dict[str, torch.Tensor], originals: dict[str, torch.Tensor], cfg: ModelConfig, world_size: int
) -> dict[str, torch.Tensor]:
    """A vllm-layout rank's tensors under the checkpoint's names (qkv/gate_up/experts split back)."""
    out: dict[str, torch.Tensor] = {}
    q_rows = cfg.num_attention_heads * cfg.head_dim // world_size
    kv_rows = max(cfg.num_key_value_heads // world_size, 1) * cfg.head_dim
    for name, tensor in state.items():
        prefix, _, last = name.rpartition(".")
        base = prefix.rpartition(".")[0] + "."
        if prefix.endswith("qkv_proj") and base + "q_proj." + last in originals:
            assert tensor.shape[0] == q_rows + 2 * kv_rows, name
            out[base + "q_proj." + last] = tensor[:q_rows]
            out[base + "k_proj." + last] = tensor[q_rows : q_rows + kv_rows]
            out[base + "v_proj." + last] = tensor[q_rows + kv_rows :]
        elif prefix.endswith("gate_up_proj") and base + "gate_proj." + last in originals:
            half = tensor.shape[0] // 2
            out[base + "gate_proj." + last], out[base + "up_proj." + last] = tensor[:half], tensor[half:]
        elif name.endswith(".experts.w13_weight"):
            stem = name[: -len("w13_weight")]
            gate, up = ("w1", "w3") if stem + "0.w1.weight" in originals else ("gate_proj", "up_proj")
            half = tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                out[f"{stem}{e}.{gate}.weight"] = tensor[e, :half]
                out[f"{stem}{e}.{up}.weight"] = tensor[e, half:]
        elif name.endswith(".experts.w2_weight"):
            stem = name[: -len("w2_weight")]
            down = "w2" if stem + "0.w2.weight" in originals else "down_proj"
            for e in range(tensor.shape[0]):
                out[f"{stem}{e}.{down}.weight"] = tensor[e]
        else:
            out[name] = tensor
    return out


def sent_bytes(original: dict[str, torch.Tensor], cfg: ModelConfig, world_size: int) -> dict[str, int]:
    """What all ranks together receive, by cause: the model once, plus the allowed duplicates."""
    out = {"model": 0, "replicated": 0, "kv_replicas": 0, "padding": 0}
    kv, head_dim = cfg.num_key_value_heads, cfg.head_dim
    extra_kv_heads = world_size - kv if world_size > kv else 0
    for name, tensor in original.items():
        size = fx.nbytes(tensor)
        out["model"] += size
        kind = oracle_kind(name)
        row = size // tensor.shape[0] if tensor.dim() else size
        if kind == "replicated":
            out["replicated"] += size * (world_size - 1)
        elif kind == "vocab":
            out["padding"] += (padded(tensor.shape[0]) - tensor.shape[0]) * row
        elif kind == "kv":
            out["kv_replicas"] += extra_kv_heads * head_dim * row
        elif kind == "qkv":
            out["kv_replicas"] += 2 * extra_kv_heads * head_dim * row
    return out


# ------------------------------------------------------------------------- fixtures


Written = dict[str, tuple[Path, dict[str, torch.Tensor]]]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Written:
    root = tmp_path_factory.mktemp("families")
    return {key: (root / key, family.write(root / key)) for key, family in fx.FAMILIES.items()}


def all_ranks(
    model_dir: Path, world_size: int, **spec: object
) -> list[tuple[list[TensorPlan], dict[str, torch.Tensor]]]:
    return [
        fx.rank_state(model_dir, ShardSpec("m", rank=r, world_size=world_size, **spec), chunk=CHUNK)  # type: ignore[arg-type]
        for r in range(world_size)
    ]


def check_gathers(
    ranks: list[dict[str, torch.Tensor]], originals: dict[str, torch.Tensor], cfg: ModelConfig, as_saved: bool
) -> None:
    assert all(set(state) == set(originals) for state in ranks)
    for name, original in originals.items():
        got = gather(oracle_kind(name), [state[name] for state in ranks], original, cfg, as_saved)
        assert torch.equal(got, fx.bits(original)), f"{name} does not gather back"


# -------------------------------------------------------------------- gather tests


@pytest.mark.parametrize("world_size", fx.WORLD_SIZES)
@pytest.mark.parametrize("key", list(fx.FAMILIES))
def test_gathering_every_rank_reproduces_the_checkpoint(written: Written, key: str, world_size: int) -> None:
    model_dir, originals = written[key]
    cfg = fx.FAMILIES[key].model_config
    if not legal(cfg, world_size):
        with pytest.raises(InvalidRequestError) as err:
            all_ranks(model_dir, world_size)
        assert str(cfg.num_attention_heads) in str(err.value) and str(world_size) in str(err.value)
        return
    ranks = all_ranks(model_dir, world_size)
    check_gathers([state for _, state in ranks], originals, cfg, as_saved=world_size == 1)
    totals = sent_bytes(originals, cfg, world_size)
    if world_size == 1:
        totals["padding"] = 0  # served as saved
    assert sum(p.nbytes for plans, _ in ranks for p in plans) == sum(totals.values())


@pytest.mark.parametrize("world_size", fx.WORLD_SIZES)
@pytest.mark.parametrize("key", ["llama-untied", "llama-tied", "qwen2", "mixtral", "qwen2_moe", "phi3"])
def test_vllm_layout_unfuses_and_gathers_back(written: Written, key: str, world_size: int) -> None:
    model_dir, originals = written[key]
    cfg = fx.FAMILIES[key].model_config
    if not legal(cfg, world_size):
        with pytest.raises(InvalidRequestError, match=rf"\b{world_size}\b"):
            all_ranks(model_dir, world_size, layout="vllm")
        return
    ranks = all_ranks(model_dir, world_size, layout="vllm")
    for _, state in ranks:
        assert not any(re.search(r"\.(?:q|k|v|gate|up)_proj\.|\.experts\.\d+\.", n) for n in state), (
            "vllm layout must hold fused tensors only"
        )
    check_gathers([unfuse_vllm(state, originals, cfg, world_size) for _, state in ranks], originals, cfg, False)
    totals = sent_bytes(originals, cfg, world_size)
    assert sum(p.nbytes for plans, _ in ranks for p in plans) == sum(totals.values())


@pytest.mark.parametrize("key", list(fx.FAMILIES))
def test_world_size_one_serves_the_checkpoint_as_saved(written: Written, key: str) -> None:
    model_dir, originals = written[key]
    plans, state = fx.rank_state(model_dir, ShardSpec("m"))
    assert set(state) == set(originals)
    for name, tensor in originals.items():
        assert fx.same_bytes(state[name], tensor), name
    with fx.open_loader(model_dir) as loader:
        by_name = {r.name: r for r in loader.records}
    for plan in plans:
        record = by_name[plan.name]
        assert [(p.source, p.offset, p.nbytes, p.rows) for p in plan.pieces] == [
            (record.source, record.offset, record.nbytes, 1)
        ], "served whole, as one byte range"


def test_vocab_padding_rows_are_zero_and_read_from_nowhere(written: Written) -> None:
    # llama-untied: V = 200 -> padded to 256 -> 32 rows per rank at W = 8. Rank 6 holds
    # rows 192..223 (8 real, 24 zero); rank 7 holds rows 224..255, all padding.
    model_dir, originals = written["llama-untied"]
    embed = originals["model.embed_tokens.weight"]
    _, state6 = fx.rank_state(model_dir, ShardSpec("m", rank=6, world_size=8))
    plans7, state7 = fx.rank_state(model_dir, ShardSpec("m", rank=7, world_size=8))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert state6[name].shape == (32, 64) and state7[name].shape == (32, 64)
        assert fx.zeros_like_bytes(state6[name][8:]) and fx.zeros_like_bytes(state7[name])
        plan7 = next(p for p in plans7 if p.name == name)
        assert all(p.source == ZEROS for p in plan7.pieces)
    assert fx.same_bytes(state6["model.embed_tokens.weight"][:8], embed[192:200])


# ----------------------------------------------------------- impossible splits


@pytest.mark.parametrize(
    ("family", "world_size", "numbers"),
    [
        # num_attention_heads 4 cannot split 8 ways.
        (fx.qwen2(), 8, ("num_attention_heads 4", "world_size 8")),
        (fx.llama(), 16, ("num_attention_heads 8", "world_size 16")),
        (fx.llama(heads=6, kv_heads=3, hidden=48), 4, ("6", "4")),
        # 12 heads split 2 ways, but 3 k/v heads do not: neither 3 | 2 nor 2 | 3.
        (fx.llama(heads=12, kv_heads=3, hidden=48), 2, ("3", "2")),
        # 12 heads (and V = 192) split 6 ways; 6 > 4 k/v heads and 4 does not divide 6.
        (fx.llama(heads=12, kv_heads=4, hidden=48, vocab=192), 6, ("num_key_value_heads 4", "world_size 6")),
        # 3 ranks: the embedding (the first tensor) already fails, V = 120 pads to 128.
        (fx.qwen2_moe(), 3, ("128", "world_size 3")),
        # intermediate 100 does not split 8 ways.
        (fx.llama(intermediate=100), 8, ("100", "8")),
        # experts' intermediate 20 does not split 8 ways (Mixtral w1/w3 on dim 0, w2 on dim 1).
        (fx.mixtral(intermediate=20), 8, ("20", "8")),
        # fused qkv of 8 heads + 2 x 2 k/v heads at 16 ranks.
        (fx.phi3(), 16, ("8", "16")),
    ],
)
def test_impossible_splits_name_the_numbers(family: Any, world_size: int, numbers: tuple[str, ...]) -> None:
    records, cfg = fx.records_of(family), family.model_config
    for layout in ("checkpoint", "vllm"):
        with pytest.raises(InvalidRequestError) as err:
            for rank in range(world_size):
                plan_shard(records, ShardSpec("m", rank=rank, world_size=world_size, layout=layout), cfg)
        for number in numbers:
            assert re.search(rf"(?<!\d){re.escape(number)}(?!\d)", str(err.value)), (number, str(err.value))


def test_padded_vocabulary_not_divisible_names_the_numbers() -> None:
    # V = 100 pads to 128 rows; 128 rows cannot be split 3 ways (only the vocab is split here).
    record = TensorRecord("model.embed_tokens.weight", "F32", (100, 4), 0, 0, 1600)
    with pytest.raises(InvalidRequestError, match=r"128.*world_size 3"):
        plan_shard([record], ShardSpec("m", rank=0, world_size=3), ModelConfig(model_type="llama"))


def test_missing_head_counts_are_an_error_not_a_guess() -> None:
    record = TensorRecord("model.layers.0.self_attn.q_proj.weight", "F32", (8, 8), 0, 0, 256)
    with pytest.raises(InvalidRequestError, match="head"):
        plan_shard([record], ShardSpec("m", rank=0, world_size=2), ModelConfig(model_type="llama"))


# --------------------------------------------------------- bytes sent and read


@pytest.mark.parametrize("world_size", fx.WORLD_SIZES)
@pytest.mark.parametrize("key", ["llama-tied", "mixtral", "qwen2_moe", "phi3"])
def test_bytes_sent_are_the_model_plus_allowed_duplicates(key: str, world_size: int) -> None:
    family = fx.FAMILIES[key]
    cfg, records = family.model_config, fx.records_of(family)
    if not legal(cfg, world_size):
        return
    originals = family.tensors()
    expected = sent_bytes(originals, cfg, world_size)
    assert expected["model"] == sum(r.nbytes for r in records)
    for layout in ("checkpoint", "vllm"):
        plans = [
            plan_shard(records, ShardSpec("m", rank=r, world_size=world_size, layout=layout), cfg)
            for r in range(world_size)
        ]
        file_bytes = sum(p.nbytes for ps in plans for plan in ps for p in plan.pieces if p.source != ZEROS)
        zero_bytes = sum(p.nbytes for ps in plans for plan in ps for p in plan.pieces if p.source == ZEROS)
        as_saved = world_size == 1 and layout == "checkpoint"
        assert zero_bytes == (0 if as_saved else expected["padding"])
        assert file_bytes == expected["model"] + expected["replicated"] + expected["kv_replicas"]
        # every rank holds the same shapes, so the same share: 1/W of all of the above
        assert {sum(p.nbytes for p in ps) for ps in plans} == {(file_bytes + zero_bytes) // world_size}


class Recorder(Source):
    """Passes reads through to a source and logs every byte range asked of it."""

    def __init__(self, inner: Source, index: int, log: list[tuple[int, int, int]]) -> None:
        self.inner, self.index, self.log = inner, index, log
        self.label, self.size = inner.label, inner.size

    def read_into(self, offset: int, dest: memoryview, check: bool = True) -> None:
        self.inner.read_into(offset, dest, check)
        self.log.append((self.index, offset, len(dest)))


def _multiplicity(name: str, record: TensorRecord, cfg: ModelConfig, world_size: int) -> np.ndarray:
    """How many ranks read each byte of a tensor's file range."""
    kind = oracle_kind(name)
    kv_copies = max(world_size // cfg.num_key_value_heads, 1)
    counts = np.ones(record.nbytes, dtype=np.int32)
    if kind == "replicated":
        counts[:] = world_size
    elif kind == "kv":
        counts[:] = kv_copies
    elif kind == "qkv":
        row = record.nbytes // record.shape[0]
        counts[cfg.num_attention_heads * cfg.head_dim * row :] = kv_copies
    return counts


@pytest.mark.parametrize("world_size", fx.WORLD_SIZES)
@pytest.mark.parametrize("key", ["llama-untied", "mixtral", "phi3", "qwen2"])
def test_serving_a_rank_reads_only_its_bytes_each_once(written: Written, key: str, world_size: int) -> None:
    model_dir, _ = written[key]
    cfg = fx.FAMILIES[key].model_config
    if not legal(cfg, world_size):
        return
    counts: dict[int, np.ndarray] = {}
    total_read = 0
    for rank in range(world_size):
        with fx.open_loader(model_dir) as loader:
            headers = sum(s.bytes_read for s in loader.sources)
            data_starts = [min(r.offset for r in loader.records if r.source == i) for i in range(len(loader.sources))]
            assert headers <= sum(start + 8 for start in data_starts), "opening reads the headers only"
            plans = plan_shard(loader.records, ShardSpec("m", rank=rank, world_size=world_size), cfg)
            log: list[tuple[int, int, int]] = []
            sources = [Recorder(s, i, log) for i, s in enumerate(loader.sources)]
            for plan in plans:
                fx.materialise(plan, sources, chunk=CHUNK)
            read = sum(s.bytes_read for s in loader.sources) - headers
            rank_file_bytes = sum(p.nbytes for plan in plans for p in plan.pieces if p.source != ZEROS)
            assert read == rank_file_bytes, "a rank reads its own bytes and nothing more"
            mine = {i: np.zeros(s.size, dtype=np.int32) for i, s in enumerate(loader.sources)}
            for index, offset, length in log:
                mine[index][offset : offset + length] += 1
            assert all(int(c.max(initial=0)) <= 1 for c in mine.values()), "a rank reads no byte twice"
            for index, c in mine.items():
                counts[index] = counts.get(index, 0) + c
            total_read += read
            records = {r.name: r for r in loader.records}
    expected = {i: np.zeros_like(c) for i, c in counts.items()}
    for name, record in records.items():
        expected[record.source][record.offset : record.offset + record.nbytes] = _multiplicity(
            name, record, cfg, world_size
        )
    for index, count in counts.items():
        assert np.array_equal(count, expected[index]), f"file {index}: bytes read a wrong number of times"
    totals = sent_bytes(fx.FAMILIES[key].tensors(), cfg, world_size)
    assert total_read == totals["model"] + totals["replicated"] + totals["kv_replicas"]


# ----------------------------------------------------------- property tests


@settings(max_examples=300, deadline=None)
@given(size=st.integers(0, 200), world_size=st.integers(1, 16))
def test_even_range_places_every_index_once(size: int, world_size: int) -> None:
    if size % world_size:
        with pytest.raises(InvalidRequestError, match=rf"\({size}\).*world_size {world_size}"):
            even_range(size, 0, world_size, "rows")
        return
    placed = [0] * size
    for rank in range(world_size):
        start, length = even_range(size, rank, world_size, "rows")
        assert length == size // world_size
        for i in range(start, start + length):
            placed[i] += 1
    assert placed == [1] * size


@settings(max_examples=300, deadline=None)
@given(
    heads_per_kv=st.integers(1, 4),
    kv=st.integers(1, 16),
    world_size=st.integers(1, 32),
    head_dim=st.integers(1, 8),
)
def test_kv_range_splits_or_replicates_heads(heads_per_kv: int, kv: int, world_size: int, head_dim: int) -> None:
    cfg = ModelConfig(
        model_type="llama", num_attention_heads=kv * heads_per_kv, num_key_value_heads=kv, head_dim=head_dim
    )
    if (world_size <= kv and kv % world_size) or (world_size > kv and world_size % kv):
        with pytest.raises(InvalidRequestError) as err:
            kv_range(cfg, 0, world_size, "k_proj")
        assert re.search(rf"(?<!\d){kv}(?!\d)", str(err.value)) and re.search(
            rf"(?<!\d){world_size}(?!\d)", str(err.value)
        )
        return
    served = [0] * (kv * head_dim)
    for rank in range(world_size):
        start, length = kv_range(cfg, rank, world_size, "k_proj")
        if world_size > kv:
            assert (start, length) == ((rank // (world_size // kv)) * head_dim, head_dim)
        for i in range(start, start + length):
            served[i] += 1
    assert served == [max(world_size // kv, 1)] * (kv * head_dim)


Case = tuple[tuple[int, ...], int, list[tuple[int, int]], int]


@st.composite
def tensors_and_ranges(draw: st.DrawFn) -> Case:
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=4)))
    dim = draw(st.integers(0, len(shape) - 1))
    ranges = []
    for _ in range(draw(st.integers(1, 3))):
        start = draw(st.integers(0, shape[dim] - 1))
        ranges.append((start, draw(st.integers(0, shape[dim] - start))))
    return shape, dim, ranges, draw(st.integers(0, 64))


def _memory_record(shape: tuple[int, ...], prefix: int) -> tuple[TensorRecord, torch.Tensor, MemorySource]:
    tensor = torch.arange(math.prod(shape), dtype=torch.int32).reshape(shape) * 7 + 3
    data = b"\xff" * prefix + tensor.numpy().tobytes() + b"\xee" * 5
    record = TensorRecord("t", "I32", shape, 0, prefix, tensor.numel() * 4)
    return record, tensor, MemorySource("mem", data)


@settings(max_examples=300, deadline=None)
@given(case=tensors_and_ranges(), cut=st.tuples(st.integers(0, 10_000), st.integers(0, 10_000)))
def test_slice_ranges_serves_the_narrowed_concatenation(case: Case, cut: tuple[int, int]) -> None:
    shape, dim, ranges, prefix = case
    record, tensor, source = _memory_record(shape, prefix)
    plan = slice_ranges(record, dim, ranges)
    expected = torch.cat([tensor.narrow(dim, s, n) for s, n in ranges], dim)
    assert plan.shape == tuple(expected.shape) and plan.nbytes == expected.numel() * 4
    assert torch.equal(fx.materialise(plan, [source]), expected)
    # any byte window of the served tensor, as a resumed or chunked stream asks for
    lo, hi = sorted(c % (plan.nbytes + 1) for c in cut)
    window = bytearray(hi - lo)
    read_range(plan, [source], lo, memoryview(window))
    assert bytes(window) == expected.numpy().tobytes()[lo:hi]


@settings(max_examples=300, deadline=None)
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=4), data=st.data())
def test_even_slices_place_every_byte_exactly_once(shape: list[int], data: st.DataObject) -> None:
    dim = data.draw(st.integers(0, len(shape) - 1))
    world_size = data.draw(st.sampled_from([w for w in range(1, 7) if shape[dim] % w == 0]))
    record, _, source = _memory_record(tuple(shape), 8)
    placed = np.zeros(source.size, dtype=np.int32)
    for rank in range(world_size):
        plan = slice_ranges(record, dim, [even_range(shape[dim], rank, world_size, "dim")])
        for p in plan.pieces:
            for row in range(p.rows):
                placed[p.offset + row * p.stride : p.offset + row * p.stride + p.row_bytes] += 1
    assert placed[: record.offset].sum() == 0 and placed[record.offset + record.nbytes :].sum() == 0
    assert (placed[record.offset : record.offset + record.nbytes] == 1).all()


# ------------------------------------------------------------------- pipeline


@pytest.mark.parametrize(
    ("layers", "stages", "expected"),
    [
        # vLLM get_pp_indices: layers // stages each; the remainder one each to the
        # stages before the last, from the second-to-last backwards.
        (10, 4, [(0, 2), (2, 5), (5, 8), (8, 10)]),
        (61, 4, [(0, 15), (15, 30), (30, 46), (46, 61)]),
        (61, 2, [(0, 31), (31, 61)]),
        (8, 4, [(0, 2), (2, 4), (4, 6), (6, 8)]),
        (7, 4, [(0, 2), (2, 4), (4, 6), (6, 7)]),
        (5, 4, [(0, 1), (1, 2), (2, 4), (4, 5)]),
        (32, 3, [(0, 11), (11, 22), (22, 32)]),
        (3, 1, [(0, 3)]),
        (2, 4, [(0, 0), (0, 1), (1, 2), (2, 2)]),
    ],
)
def test_stage_layers_match_vllm(layers: int, stages: int, expected: list[tuple[int, int]]) -> None:
    got = [stage_layers(layers, r, stages) for r in range(stages)]
    assert [(r.start, r.stop) for r in got] == expected


@settings(max_examples=200, deadline=None)
@given(layers=st.integers(0, 200), stages=st.integers(1, 16))
def test_stage_layers_partition_the_layers(layers: int, stages: int) -> None:
    got = [stage_layers(layers, r, stages) for r in range(stages)]
    assert [i for r in got for i in r] == list(range(layers))
    sizes = [len(r) for r in got]
    assert sizes[-1] == layers // stages
    assert set(sizes) <= {layers // stages, layers // stages + 1}


PP_NAMES = {
    # llama-tied: 3 layers over 2 stages -> [0, 1] and [2]; the last stage also gets
    # the embedding its tied lm_head reuses.
    ("llama-tied", 2): [
        {"model.embed_tokens.weight", "layers.0", "layers.1"},
        {"model.embed_tokens.weight", "layers.2", "model.norm.weight"},
    ],
    ("llama-tied", 3): [
        {"model.embed_tokens.weight", "layers.0"},
        {"layers.1"},
        {"model.embed_tokens.weight", "layers.2", "model.norm.weight"},
    ],
    ("llama-untied", 2): [
        {"model.embed_tokens.weight", "layers.0"},
        {"layers.1", "model.norm.weight", "lm_head.weight"},
    ],
    ("mixtral", 2): [
        {"model.embed_tokens.weight", "layers.0"},
        {"layers.1", "model.norm.weight", "lm_head.weight"},
    ],
}


def _coarse(name: str) -> str:
    match = re.match(r"model\.(layers\.\d+)\.", name)
    return match.group(1) if match else name


@pytest.mark.parametrize(("key", "pp_size"), list(PP_NAMES))
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_tp_by_pp_stages_hold_their_layers_and_gather_back(
    written: Written, key: str, pp_size: int, world_size: int
) -> None:
    model_dir, originals = written[key]
    cfg = fx.FAMILIES[key].model_config
    seen: dict[str, int] = {}
    for pp_rank in range(pp_size):
        ranks = all_ranks(model_dir, world_size, pp_rank=pp_rank, pp_size=pp_size)
        names = set(ranks[0][1])
        assert {_coarse(n) for n in names} == PP_NAMES[key, pp_size][pp_rank]
        order = [n for n in ranks[0][1]]
        groups = [0 if "embed_tokens" in n else 2 if ("lm_head" in n or n == "model.norm.weight") else 1 for n in order]
        assert groups == sorted(groups), "stream order: embeddings, layers, head"
        layers = [int(m.group(1)) for n in order if (m := re.match(r"model\.layers\.(\d+)\.", n))]
        assert layers == sorted(layers)
        for name in names:
            got = gather(oracle_kind(name), [state[name] for _, state in ranks], originals[name], cfg)
            assert torch.equal(got, fx.bits(originals[name])), name
            seen[name] = seen.get(name, 0) + 1
    assert set(seen) == set(originals)
    assert all(count == 1 or name == "model.embed_tokens.weight" for name, count in seen.items())


def test_pp_with_vllm_layout_splits_stages_and_fuses(written: Written) -> None:
    model_dir, _ = written["mixtral"]
    _, state = fx.rank_state(model_dir, ShardSpec("m", rank=1, world_size=2, pp_rank=1, pp_size=2, layout="vllm"))
    assert {n for n in state} == {
        "model.layers.1.input_layernorm.weight",
        "model.layers.1.self_attn.qkv_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.1.post_attention_layernorm.weight",
        "model.layers.1.block_sparse_moe.gate.weight",
        "model.layers.1.block_sparse_moe.experts.w13_weight",
        "model.layers.1.block_sparse_moe.experts.w2_weight",
        "model.norm.weight",
        "lm_head.weight",
    }
