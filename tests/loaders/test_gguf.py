"""GGUF loader oracle tests: files written by the gguf package's own writer, read back.

F32/F16/BF16 tensors must come back as the values written; quantized ones as the raw
blocks written (and dequantize to the same values); Llama's q/k un-permuted against
convert_hf_to_gguf's own permute formula; names in Hugging Face form.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from tests.loaders.gguf_fixtures import SHAPE, Written, reference_permute, write_llama_gguf
from weightserve.cache.model_cache import model_config_for
from weightserve.errors import CorruptCheckpointError, PreconditionError
from weightserve.loaders import FORMAT_PREFERENCE, loader_for
from weightserve.loaders.base import Loader
from weightserve.loaders.gguf import GGUFLoader
from weightserve.loaders.gguf_names import hf_name
from weightserve.loaders.gguf_rows import PermutedRows, gguf_rows
from weightserve.loaders.pieces import read_range
from weightserve.loaders.sources import MemorySource
from weightserve.sharding.model_config import ModelConfig
from weightserve.sharding.tensor_plan import whole_tensor
from weightserve.testing import llama_tensor_shapes


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Written]:
    model_dir = tmp_path_factory.mktemp("gguf") / "tiny"
    return model_dir, write_llama_gguf(model_dir)


def served(loader: Loader) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """name -> (dtype, shape, bytes), read through the plan path the server uses."""
    out = {}
    for record in loader.records:
        buf = bytearray(record.nbytes)
        read_range(whole_tensor(record), loader.sources, 0, memoryview(buf))
        out[record.name] = (record.dtype, record.shape, bytes(buf))
    return out


def test_registered_after_safetensors_and_torch() -> None:
    assert loader_for("gguf") is GGUFLoader
    assert FORMAT_PREFERENCE.index("gguf") > FORMAT_PREFERENCE.index("torch") > FORMAT_PREFERENCE.index("safetensors")


def test_every_tensor_round_trips(single: tuple[Path, Written]) -> None:
    model_dir, written = single
    with GGUFLoader(GGUFLoader.find_files(model_dir)) as loader:
        got = served(loader)
        quant = {r.name: r.quant for r in loader.records}
        assert loader.quant_types == {n: t.name for n, t in written.types.items() if quant.get(n)}
    assert set(got) == set(written.expected)
    for name, (dtype, shape, data) in written.expected.items():
        assert got[name][:2] == (dtype, shape), name
        assert got[name][2] == data, name  # raw block bytes (and float bits) equal
        qtype = written.types[name]
        assert quant[name] == ("" if dtype != "U8" else qtype.name)


def test_names_and_shapes_are_hugging_face(single: tuple[Path, Written]) -> None:
    model_dir, _ = single
    hf = llama_tensor_shapes(SHAPE)
    with GGUFLoader(GGUFLoader.find_files(model_dir)) as loader:
        assert [r.name for r in loader.records] == list(hf)
        for record in loader.records:
            assert record.shape[0] == hf[record.name][0]
            if not record.quant:
                assert record.shape == hf[record.name]
    assert hf_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
    assert hf_name("rope_freqs.weight") == "rope_freqs.weight"


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_K])
def test_quantized_tensors_dequantize_to_what_was_written(single: tuple[Path, Written], qtype: T) -> None:
    model_dir, written = single
    names = [n for n, t in written.types.items() if t == qtype]
    assert names
    with GGUFLoader(GGUFLoader.find_files(model_dir)) as loader:
        got = served(loader)
    for name in names:
        _, shape, data = got[name]
        ours = dequantize(np.frombuffer(data, dtype=np.uint8).reshape(shape), qtype)
        reference = dequantize(np.frombuffer(written.expected[name][2], np.uint8).reshape(shape), qtype)
        np.testing.assert_array_equal(ours, reference)
        if qtype != T.Q4_K:  # quantized from known values: close to them
            np.testing.assert_allclose(ours, written.hf[name], atol=0.2 * np.abs(written.hf[name]).max())


@pytest.mark.parametrize(("rows", "heads"), [(8, 2), (64, 4), (32, 2), (96, 3), (4, 1)])
def test_unpermutation_inverts_the_reference_permute(rows: int, heads: int) -> None:
    hf = np.arange(rows * 3).reshape(rows, 3)
    stored = reference_permute(hf, heads)
    np.testing.assert_array_equal(stored[gguf_rows(rows, heads)], hf)


def test_permuted_source_serves_any_range_in_hugging_face_order() -> None:
    rows, heads, row_bytes = 48, 3, 10
    hf = np.random.default_rng(1).integers(0, 256, (rows, row_bytes), dtype=np.uint8)
    stored = np.concatenate([np.zeros(7, np.uint8), reference_permute(hf, heads).reshape(-1)])
    source = PermutedRows(MemorySource("stored", stored), 7, n_rows=rows, row_bytes=row_bytes, n_head=heads, label="q")
    flat = hf.reshape(-1).tobytes()
    rng = np.random.default_rng(2)
    for _ in range(200):
        start = int(rng.integers(0, len(flat)))
        length = int(rng.integers(0, len(flat) - start + 1))
        buf = bytearray(length)
        source.read_into(start, memoryview(buf))
        assert bytes(buf) == flat[start : start + length]
    with pytest.raises(CorruptCheckpointError):
        gguf_rows(30, 4)


def test_split_files_are_one_checkpoint(tmp_path: Path, single: tuple[Path, Written]) -> None:
    written = write_llama_gguf(tmp_path / "split", split_max_tensors=2)  # 21 tensors: 11 parts
    files = GGUFLoader.find_files(tmp_path / "split")
    assert [f.name for f in files] == [f"model-{i:05d}-of-00011.gguf" for i in range(1, 12)]
    with GGUFLoader(files) as loader:
        got = served(loader)
        config = loader.model_config_dict()
    assert got == written.expected == served_single(single)
    assert config is not None and config["num_hidden_layers"] == 2
    files[2].unlink()
    with pytest.raises(CorruptCheckpointError, match=r"parts \[1, 2, 4, 5, 6, 7, 8, 9, 10, 11\], not 1..11"):
        GGUFLoader.find_files(tmp_path / "split")


def served_single(single: tuple[Path, Written]) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    with GGUFLoader(GGUFLoader.find_files(single[0])) as loader:
        return served(loader)


def test_several_models_in_one_directory_serve_none(
    tmp_path: Path, single: tuple[Path, Written], caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "m").mkdir()
    for name in ("a.gguf", "b.gguf", "mmproj-x.gguf"):
        (tmp_path / "m" / name).write_bytes(single[1].files[0].read_bytes())
    assert GGUFLoader.find_files(tmp_path / "m") == []
    assert "several GGUF models (a.gguf, b.gguf)" in caplog.text
    (tmp_path / "m" / "b.gguf").unlink()  # a multimodal projector beside the model is not the model
    assert GGUFLoader.find_files(tmp_path / "m") == [tmp_path / "m" / "a.gguf"]


def test_config_comes_from_metadata_unless_there_is_a_config_json(tmp_path: Path) -> None:
    write_llama_gguf(tmp_path / "tied", tie=True)
    with GGUFLoader(GGUFLoader.find_files(tmp_path / "tied")) as loader:
        raw = loader.model_config_dict()
        assert raw is not None
        assert raw["tie_word_embeddings"] is True
        assert ModelConfig.from_dict(raw) == ModelConfig(
            model_type="llama", num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_size=64,
            vocab_size=96, num_hidden_layers=2, tie_word_embeddings=True,
        )  # fmt: skip
        assert raw["intermediate_size"] == 512 and raw["rms_norm_eps"] == pytest.approx(1e-5)
        assert model_config_for(loader, tmp_path / "tied").num_attention_heads == 4
        (tmp_path / "tied" / "config.json").write_text(json.dumps({"model_type": "llama", "num_attention_heads": 8}))
        assert model_config_for(loader, tmp_path / "tied").num_attention_heads == 8


def test_truncated_file_is_corrupt(tmp_path: Path, single: tuple[Path, Written]) -> None:
    data = single[1].files[0].read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "model.gguf").write_bytes(data[: len(data) - 100])
    with pytest.raises(CorruptCheckpointError, match=r"model\.gguf"):
        GGUFLoader(GGUFLoader.find_files(tmp_path / "cut"))
    (tmp_path / "cut" / "model.gguf").write_bytes(b"GGUF" + bytes(10))
    with pytest.raises(CorruptCheckpointError, match="not a valid GGUF file"):
        GGUFLoader([tmp_path / "cut" / "model.gguf"])


def test_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch, single: tuple[Path, Written]) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(PreconditionError, match=r"weightserve\[gguf\]"):
        GGUFLoader(single[1].files)
