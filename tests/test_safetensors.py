"""The header reader against hostile files, and the streaming writer against safetensors itself."""

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from loadgraph.errors import InputError
from loadgraph.formats.safetensors import PlannedTensor, ShardWriter, read_header, read_tensor, st_dtype


def raw_file(path: Path, header: dict, data: bytes) -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def test_reads_what_safetensors_writes(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).bfloat16(), "c": torch.arange(6, dtype=torch.int64)}
    save_file(tensors, tmp_path / "x.safetensors")
    header = read_header(tmp_path / "x.safetensors")
    for name, t in tensors.items():
        assert torch.equal(read_tensor(tmp_path / "x.safetensors", header.tensors[name]), t)


@pytest.mark.parametrize(
    "header,data,match",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "outside"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlaps"),
        ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 12 bytes"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}, b"\0" * 8, "non-negative"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, "reversed"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, "trailing"),
        ({"a": [1, 2]}, b"", "exactly dtype"),
    ],
)
def test_hostile_headers_are_clear_errors(tmp_path, header, data, match):
    with pytest.raises(InputError, match=match):
        read_header(raw_file(tmp_path / "bad.safetensors", header, data))


def test_truncated_and_oversized_header(tmp_path):
    p = tmp_path / "t.safetensors"
    p.write_bytes(b"\x01\x02")
    with pytest.raises(InputError, match="truncated"):
        read_header(p)
    p.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(InputError, match="larger than the file"):
        read_header(p)
    p.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{}")
    with pytest.raises(InputError, match="not valid JSON"):
        read_header(p)
    good = tmp_path / "g.safetensors"
    save_file({"w": torch.randn(64, 64)}, good)
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:-100])
    with pytest.raises(InputError, match="outside"):
        read_header(tmp_path / "cut.safetensors")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=256), claimed=st.integers(min_value=0, max_value=2**64 - 1))
def test_fuzz_header_never_crashes(tmp_path, blob, claimed):
    p = tmp_path / "fuzz.safetensors"
    p.write_bytes(struct.pack("<Q", claimed) + blob)
    try:
        header = read_header(p)
    except InputError:
        return
    # Accepted: every tensor lies inside the file.
    for entry in header.tensors.values():
        assert header.data_offset <= entry.begin <= entry.end <= header.file_size


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.dictionaries(st.text(max_size=5), st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "BF16", "I8", "X"]), "shape": st.lists(st.integers(-2, 5), max_size=3), "data_offsets": st.lists(st.integers(-4, 64), min_size=2, max_size=2)}), max_size=4), pad=st.binary(max_size=64))
def test_fuzz_structured_headers(tmp_path, doc, pad):
    p = raw_file(tmp_path / "s.safetensors", doc, pad)
    try:
        header = read_header(p)
    except InputError:
        return
    # If we accept it, safetensors itself must read every tensor identically.
    ref = load_file(p) if header.tensors else {}
    for name, entry in header.tensors.items():
        assert torch.equal(read_tensor(p, entry).view(torch.uint8), ref[name].view(torch.uint8))


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_writer_is_byte_identical_to_safetensors(tmp_path, metadata):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "model.embed": torch.randn(7, 3, generator=g),
        "b": torch.randn(5, generator=g).bfloat16(),
        "a.half": torch.randn(3, generator=g).half(),
        "i8": torch.randint(-5, 5, (9,), dtype=torch.int8, generator=g),
        "u8": torch.randint(0, 200, (3, 3), dtype=torch.uint8, generator=g),
        "fp8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
        "i64": torch.arange(3),
        "empty": torch.zeros(0),
    }
    save_file(tensors, tmp_path / "ref.safetensors", metadata=metadata)
    writer = ShardWriter(tmp_path / "ours.safetensors", [PlannedTensor(k, st_dtype(v), tuple(v.shape)) for k, v in tensors.items()], metadata)
    for planned in writer.pending:
        writer.write_tensor(planned.name, tensors[planned.name])
    writer.close()
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


@pytest.mark.parametrize("split_min", [1 << 40, 64])  # one run (BLAKE3's own threads), many parallel runs
def test_file_digests_equal_the_one_pass_tree_of_blake3_per_tensor(tmp_path, monkeypatch, split_min):
    import blake3

    from loadgraph.formats import digest

    g = torch.Generator().manual_seed(1)
    tensors = {f"t{i}": torch.randn(16 * (i + 1), generator=g) for i in range(9)} | {"empty": torch.zeros(0), "u8": torch.arange(7, dtype=torch.uint8)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, path)
    header = read_header(path)
    one_pass = digest.TreeHasher.for_header(header)  # what a writer computes as it writes the file
    one_pass.update(path.read_bytes())
    monkeypatch.setattr(digest, "SPLIT_MIN", split_min)
    monkeypatch.setattr(digest.os, "sched_getaffinity", lambda _: range(4))
    tree, per_tensor = digest.safetensors_digests(path)
    assert (tree, per_tensor) == one_pass.finish()
    blob = path.read_bytes()
    assert per_tensor == {n: blake3.blake3(blob[e.begin:e.end]).hexdigest() for n, e in header.tensors.items()}
