"""The sharded safetensors reader under hostile files: overlapping or out-of-range offsets,
sizes that disagree with shape and dtype, headers longer than the file, index files pointing
outside the checkpoint folder, unknown dtypes and malformed JSON. Each is a ``CheckpointError``
naming the file and tensor, never a raw exception or a silently wrong tensor; and integer and
bool tensors are never cast to float (issue 13, items 5 and 9)."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from netmeld.errors import CheckpointError
from netmeld.io.checkpoint_merge import merge_weights
from netmeld.io.shards import INDEX_FILE, CheckpointReader


def _raw(header: dict, data: bytes = b"", *, length: int | None = None) -> bytes:
    """The bytes of a safetensors file with ``header`` (a JSON object) and ``data``."""
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def _f32(offsets, shape=(2,)) -> dict:
    return {"dtype": "F32", "shape": list(shape), "data_offsets": list(offsets)}


def _write(path: Path, header: dict, data: bytes = b"", **kwargs) -> Path:
    path.write_bytes(_raw(header, data, **kwargs))
    return path


def _read_all(path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(path)
    return {name: reader.get(name) for name in reader}


# -- offsets -----------------------------------------------------------------------------------


def test_overlapping_offsets_are_refused_like_the_safetensors_library_does(tmp_path):
    path = _write(tmp_path / "m.safetensors", {"a": _f32([0, 8]), "b": _f32([4, 12])}, bytes(12))
    with pytest.raises(Exception, match=r"(?i)offset"), safe_open(str(path), "pt") as f:
        f.get_tensor("a")  # the library's own check
    with pytest.raises(CheckpointError, match=r"m\.safetensors.*'a'.*'b'.*overlap"):
        CheckpointReader(path)


def test_a_tensor_inside_another_is_an_overlap(tmp_path):
    header = {"big": _f32([0, 16], (4,)), "small": _f32([4, 12])}
    path = _write(tmp_path / "m.safetensors", header, bytes(16))
    with pytest.raises(CheckpointError, match=r"'big'.*'small'.*overlap"):
        CheckpointReader(path)


def test_empty_tensors_share_an_offset_without_overlapping(tmp_path):
    header = {"a": _f32([0, 8]), "e1": _f32([8, 8], (0,)), "e2": _f32([8, 8], (0, 3))}
    tensors = _read_all(_write(tmp_path / "m.safetensors", header, bytes(8)))
    assert tensors["e2"].shape == (0, 3) and tensors["a"].shape == (2,)


@pytest.mark.parametrize(
    ("entry", "data", "what"),
    [
        (_f32([0, 8]), bytes(4), "past the end"),
        (_f32([8, 16]), bytes(8), "past the end"),
        (_f32([0, 8], (3,)), bytes(12), "needs 12"),
        (_f32([0, 12]), bytes(12), "needs 8"),
        (_f32([8, 0]), bytes(8), "start after its end"),
    ],
    ids=["end-beyond-file", "start-beyond-file", "too-few-bytes", "too-many-bytes", "reversed"],
)
def test_offsets_out_of_range_or_of_the_wrong_size_are_refused(tmp_path, entry, data, what):
    path = _write(tmp_path / "m.safetensors", {"w": entry}, data)
    with pytest.raises(CheckpointError, match=rf"m\.safetensors.*'w'.*{what}"):
        CheckpointReader(path)


def test_a_header_longer_than_the_file_is_refused(tmp_path):
    header = {"e": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}
    text = len(_raw(header)) - 8
    path = _write(tmp_path / "m.safetensors", header, length=text + 64)
    with pytest.raises(CheckpointError, match=r"m\.safetensors.*header.*\d+ bytes"):
        CheckpointReader(path)


# -- header entries ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "what"),
    [
        ({"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}, "dtype 'F8_E4M3'"),
        ({"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}, "dtype 'C64'"),
        ({"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}, "dtype"),
        ({"dtype": None, "shape": [2], "data_offsets": [0, 8]}, "dtype"),
        ({"shape": [2], "data_offsets": [0, 8]}, "dtype"),
        ({"dtype": "F32", "data_offsets": [0, 8]}, "shape"),
        ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "shape"),
        ({"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}, "shape"),
        ({"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}, "shape"),
        ({"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}, "shape"),
        ({"dtype": "F32", "shape": [2]}, "data_offsets"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0]}, "data_offsets"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 9]}, "data_offsets"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}, "data_offsets"),
        ({"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}, "data_offsets"),
        ({"dtype": "F32", "shape": [2], "data_offsets": {"0": 8}}, "data_offsets"),
        ([1, 2, 3], "object"),
        ("F32", "object"),
        (None, "object"),
    ],
)
def test_malformed_entries_name_the_file_tensor_and_field(tmp_path, entry, what):
    path = _write(tmp_path / "m.safetensors", {"w": entry}, bytes(8))
    with pytest.raises(CheckpointError, match=rf"m\.safetensors.*'w'.*{what}"):
        CheckpointReader(path)


@pytest.mark.parametrize("metadata", [[1], "x", {"k": 1}, {"k": None}])
def test_malformed_metadata_is_refused(tmp_path, metadata):
    path = _write(
        tmp_path / "m.safetensors", {"__metadata__": metadata, "w": _f32([0, 8])}, bytes(8)
    )
    with pytest.raises(CheckpointError, match=r"m\.safetensors.*__metadata__"):
        CheckpointReader(path)


def test_a_tensor_named_twice_in_one_header_is_refused(tmp_path):
    text = b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
    text += b'"w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}'
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(16))
    with pytest.raises(CheckpointError, match=r"m\.safetensors.*'w'.*twice"):
        CheckpointReader(path)


@pytest.mark.parametrize(
    "text",
    [b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe{}", b"[]", b"null", b"", b"{", b'{"a": NaN}'],
    ids=["deep", "not-utf8", "array", "null", "empty", "truncated", "nan"],
)
def test_unreadable_headers_are_checkpoint_errors(tmp_path, text):
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text)
    with pytest.raises(CheckpointError, match=r"m\.safetensors"):
        CheckpointReader(path)


def test_bool_tensors_must_hold_zeros_and_ones(tmp_path):
    entry = {"dtype": "BOOL", "shape": [3], "data_offsets": [0, 3]}
    good = _write(tmp_path / "good.safetensors", {"b": entry}, bytes([1, 0, 1]))
    assert CheckpointReader(good).get("b").tolist() == [True, False, True]
    bad = _write(tmp_path / "bad.safetensors", {"b": entry}, bytes([1, 7, 1]))
    with pytest.raises(CheckpointError, match=r"bad\.safetensors.*'b'.*bool"):
        CheckpointReader(bad).get("b")


def test_an_unknown_tensor_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(2)}, str(path))
    with pytest.raises(CheckpointError, match=r"m\.safetensors.*'v'"):
        CheckpointReader(path).get("v")


def test_a_file_truncated_after_opening_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(1000)}, str(path))
    reader = CheckpointReader(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"m\.safetensors.*'w'"):
        reader.get("w")


# -- index files and folders -------------------------------------------------------------------


def _sharded(folder: Path, weight_map: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.fixture
def outside(tmp_path) -> Path:
    """A valid checkpoint outside the folder an index will point from."""
    path = tmp_path / "secret.safetensors"
    save_file({"w": torch.arange(4.0)}, str(path))
    return path


def test_an_index_naming_an_absolute_path_is_refused(tmp_path, outside):
    folder = _sharded(tmp_path / "ckpt", {"w": str(outside)})
    with pytest.raises(CheckpointError, match=r"index.*'w'.*outside the checkpoint folder"):
        CheckpointReader(folder)


def test_an_index_naming_a_parent_path_is_refused(tmp_path, outside):
    folder = _sharded(tmp_path / "ckpt", {"w": "../secret.safetensors"})
    with pytest.raises(CheckpointError, match=r"index.*'w'.*outside the checkpoint folder"):
        CheckpointReader(folder)


def test_an_index_naming_a_symlink_pointing_outside_is_refused(tmp_path, outside):
    folder = _sharded(tmp_path / "ckpt", {"w": "model-1.safetensors"})
    (folder / "model-1.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError, match=r"index.*'w'.*outside the checkpoint folder"):
        CheckpointReader(folder)


def test_a_shard_symlink_pointing_outside_is_refused_without_an_index(tmp_path, outside):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*outside the checkpoint folder"):
        CheckpointReader(folder)


def test_symlinks_inside_the_folder_and_a_hugging_face_cache_are_followed(tmp_path):
    # the Hugging Face hub cache: snapshots/<rev>/file -> ../../blobs/<hash>
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    save_file({"w": torch.arange(3.0)}, str(repo / "blobs" / "abc123"))
    snapshot = _sharded(repo / "snapshots" / "rev1", {"w": "model-00001-of-00001.safetensors"})
    (snapshot / "model-00001-of-00001.safetensors").symlink_to("../../blobs/abc123")
    assert CheckpointReader(snapshot).get("w").tolist() == [0.0, 1.0, 2.0]
    inside = tmp_path / "plain"
    inside.mkdir()
    save_file({"w": torch.ones(2)}, str(inside / "real.bin"))
    (inside / "model.safetensors").symlink_to("real.bin")
    assert CheckpointReader(inside).get("w").tolist() == [1.0, 1.0]


def test_a_missing_shard_names_the_index_tensor_and_shard(tmp_path):
    folder = _sharded(tmp_path / "ckpt", {"w": "model-00002-of-00002.safetensors"})
    with pytest.raises(CheckpointError, match=r"index.*'w'.*model-00002-of-00002.*missing"):
        CheckpointReader(folder)


def test_an_index_naming_a_tensor_its_shard_lacks_is_refused(tmp_path):
    folder = _sharded(tmp_path / "ckpt", {"w": "a.safetensors", "v": "a.safetensors"})
    save_file({"w": torch.ones(2)}, str(folder / "a.safetensors"))
    with pytest.raises(CheckpointError, match=r"index.*'v'.*a\.safetensors.*does not hold"):
        CheckpointReader(folder)


@pytest.mark.parametrize(
    "content",
    [b"[1, 2]", b"null", b'{"weight_map": [1]}', b'{"weight_map": {"w": 3}}', b"\xff\xfe", b"{"],
    ids=["array", "null", "map-array", "map-number", "not-utf8", "truncated"],
)
def test_a_malformed_index_is_a_checkpoint_error(tmp_path, content):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / INDEX_FILE).write_bytes(content)
    with pytest.raises(CheckpointError, match=r"index"):
        CheckpointReader(folder)


# -- no silent casts ---------------------------------------------------------------------------


def test_integer_and_bool_tensors_keep_their_dtype_through_a_reduced_precision_merge(tmp_path):
    ids = torch.arange(2**40, 2**40 + 6, dtype=torch.int64)  # not representable in float16/32
    mask = torch.tensor([True, False, True])
    for i, name in enumerate(("a", "b")):
        state = {"w": torch.full((3,), float(i + 1)), "position_ids": ids, "mask": mask}
        save_file(state, str(tmp_path / f"{name}.safetensors"))
    reader = CheckpointReader(tmp_path / "a.safetensors")
    assert reader.get("position_ids").dtype == torch.int64
    assert reader.get("mask").dtype == torch.bool
    recipe = {
        "merge_method": "linear",
        "models": [{"model": "a.safetensors"}, {"model": "b.safetensors"}],
        "dtype": "float16",
        "out_dtype": "bfloat16",
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = _read_all(merge_weights(tmp_path / "r.yaml", tmp_path / "out"))
    assert out["w"].dtype == torch.bfloat16 and out["w"].tolist() == [1.5] * 3
    assert out["position_ids"].dtype == torch.int64 and torch.equal(out["position_ids"], ids)
    assert out["mask"].dtype == torch.bool and torch.equal(out["mask"], mask)


# -- properties (hypothesis) -------------------------------------------------------------------


def _valid_file() -> bytes:
    state = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.tensor([1, -2], dtype=torch.int64),
        "c": torch.tensor([True, False]),
        "d": torch.ones(3, dtype=torch.bfloat16),
    }
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.safetensors"
        save_file(state, str(path), metadata={"format": "pt"})
        return path.read_bytes()


VALID = _valid_file()
(HEADER_LEN,) = struct.unpack("<Q", VALID[:8])
HEADER = json.loads(VALID[8 : 8 + HEADER_LEN])
DATA = VALID[8 + HEADER_LEN :]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["F32", "I64", "BOOL", "BF16", "F16", "X"]),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=10,
)


@st.composite
def mutated_files(draw) -> bytes:
    header = json.loads(json.dumps(HEADER))
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(sorted(header)))
        if name == "__metadata__" or not isinstance(header[name], dict) or draw(st.booleans()):
            header[name] = draw(json_values) if draw(st.booleans()) else {}
        else:
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
            if draw(st.booleans()):
                header[name].pop(field, None)
            elif field == "data_offsets":
                header[name][field] = draw(st.lists(st.integers(-4, len(DATA) + 8), max_size=3))
            elif field == "shape":
                header[name][field] = draw(st.lists(st.integers(-1, 6), max_size=3))
            else:
                header[name][field] = draw(json_values)
    text = json.dumps(header).encode()
    length = len(text)
    if draw(st.booleans()):
        length = draw(st.integers(0, 2**64 - 1) | st.integers(max(0, length - 8), length + 40))
    raw = bytearray(struct.pack("<Q", length) + text + DATA)
    for _ in range(draw(st.integers(0, 3))):  # garble some bytes
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):  # truncate
        raw = raw[: draw(st.integers(0, len(raw)))]
    return bytes(raw)


@settings(max_examples=50, deadline=None)
@given(mutated_files())
def test_garbled_files_give_a_reader_or_a_checkpoint_error(raw):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.safetensors"
        path.write_bytes(raw)
        try:
            reader = CheckpointReader(path)
            for name in reader:
                info = reader.tensors[name]
                tensor = reader.get(name)
                assert tensor.dtype == info.dtype and tuple(tensor.shape) == info.shape
        except CheckpointError:
            pass


@settings(max_examples=50, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["a", "b", "c", "d", "zz"]),
        st.sampled_from(["m.safetensors", "/etc/passwd", "../m.safetensors", "", ".", "x"])
        | st.text(max_size=12),
        max_size=5,
    )
)
def test_garbled_indexes_give_a_reader_or_a_checkpoint_error(weight_map):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "ckpt"
        root.mkdir()
        (root / "m.safetensors").write_bytes(VALID)
        (Path(folder) / "m.safetensors").write_bytes(VALID)  # a valid file outside
        (root / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
        try:
            reader = CheckpointReader(root)
            for name in reader:
                reader.get(name)
                assert reader.tensors[name].file.resolve().parent == root.resolve()
        except CheckpointError:
            pass
