"""llmkit's GGUF header reader (llmkit/gguf_file.py) against gguf's GGUFReader, the reference: every metadata value
and every tensor (name, type, shape, bytes, data) equal on a file written by gguf's GGUFWriter with every value type,
and on the real SmolLM2 file; a damaged file is a ValueError that names the problem."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GGML

from llmkit.checkpoints import default_model_path
from llmkit.checkpoints.gguf import open_gguf
from llmkit.errors import LlmkitError
from llmkit.gguf_file import GgufFile


def assert_same_as_gguf(path: Path) -> GgufFile:
    ours, theirs = GgufFile(path), gguf.GGUFReader(path)
    reference = {key: field.contents() for key, field in theirs.fields.items() if not key.startswith("GGUF.")}
    assert ours.fields == reference
    for key, value in ours.fields.items():  # the same Python types too (an int is not a float, a bool not an int)
        assert type(value) is type(reference[key]), key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, ref in zip(ours.tensors, theirs.tensors):
        assert (mine.tensor_type, mine.shape, mine.n_elements, mine.n_bytes) == (
            ref.tensor_type, tuple(int(d) for d in ref.shape), int(ref.n_elements), int(ref.n_bytes)), mine.name
        assert mine.data.dtype == ref.data.dtype and mine.data.shape == ref.data.shape, mine.name
        assert np.array_equal(mine.data, ref.data), mine.name
    return ours


def write_every_type(path: Path, alignment: int | None = None) -> None:
    writer = gguf.GGUFWriter(path, "llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -100)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -30000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_uint64("t.u64", 2**63 + 5)
    writer.add_int64("t.i64", -(2**62))
    writer.add_float32("t.f32", 1e-5)
    writer.add_float64("t.f64", 0.1)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo ▁world")
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.floats", [0.5, -1.25])
    writer.add_array("t.strings", ["a", "", "Ġthe", "<0x0A>"])
    writer.add_array("t.bools", [True, False])
    writer.add_array("t.empty", [])
    rng = np.random.default_rng(0)
    writer.add_tensor("f32", rng.standard_normal((3, 64), dtype=np.float32))
    writer.add_tensor("f16", rng.standard_normal((2, 5, 32)).astype(np.float16))
    q8 = gguf.quants.quantize(rng.standard_normal((4, 64), dtype=np.float32), GGML.Q8_0)
    writer.add_tensor("q8", q8, raw_dtype=GGML.Q8_0)
    bf16 = gguf.quants.quantize(rng.standard_normal((2, 32), dtype=np.float32), GGML.BF16)
    writer.add_tensor("bf16", bf16, raw_dtype=GGML.BF16)
    writer.add_tensor("i32", np.arange(7, dtype=np.int32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("alignment", [None, 64])
def test_every_value_and_tensor_type_equals_gguf_reader(tmp_path, alignment):
    path = tmp_path / "every.gguf"
    write_every_type(path, alignment)
    ours = assert_same_as_gguf(path)
    assert ours.fields["t.strings"] == ["a", "", "Ġthe", "<0x0A>"] and ours.fields["t.u64"] == 2**63 + 5
    assert ours.path == path


def test_real_smollm2_file_equals_gguf_reader():
    ours = assert_same_as_gguf(default_model_path())
    assert len(ours.fields["tokenizer.ggml.tokens"]) == 49152


def test_damaged_files_are_value_errors_and_open_gguf_names_them(tmp_path):
    path = tmp_path / "every.gguf"
    write_every_type(path)
    data = path.read_bytes()
    cases = {
        "magic.gguf": (b"GGML" + data[4:], "magic"),
        "version.gguf": (data[:4] + (9).to_bytes(4, "little") + data[8:], "version 9"),
        "header.gguf": (data[:300], "past the end"),  # cut inside the metadata
        "tensor.gguf": (data[:-8], "tensor i32 runs past the end"),  # the last tensor's bytes cut
    }
    for name, (content, message) in cases.items():
        damaged = tmp_path / name
        damaged.write_bytes(content)
        with pytest.raises(ValueError, match=message):
            GgufFile(damaged)
        with pytest.raises(LlmkitError, match=f"{name} is not a readable GGUF file .*re-download it"):
            open_gguf(damaged)
