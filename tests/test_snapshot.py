"""Snapshots: export to zarr v3 with tensorstore, read with zarr-python, import bit-exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import json
import os

from kvtier import ChunkKey, KVLayout, LayoutMismatchError, SnapshotError, StoreConfig, TieredStore
from kvtier.snapshot import export_sequence, import_sequence, read_snapshot_layout, register_zarr_bfloat16


def _layout(dtype: torch.dtype = torch.bfloat16) -> KVLayout:
    return KVLayout(num_layers=3, num_kv_heads=2, head_dim=8, dtype=dtype, chunk_size=4, group_size=2)


def _chunk(layout: KVLayout, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layout.chunk_shape, generator=g).to(layout.dtype)


def _store(layout: KVLayout, tmp_path=None) -> TieredStore:
    return TieredStore(
        layout,
        StoreConfig(
            gpu_bytes=0, host_bytes=8 * layout.chunk_bytes, device="cpu", disk_bytes="1MiB", disk_dir=tmp_path
        ),
    )


def _fill(store: TieredStore, seq: int, num_chunks: int) -> None:
    for layer in range(store.layout.num_layers):
        for c in range(num_chunks):
            store.write((seq, layer, c), _chunk(store.layout, 100 * layer + c))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_export_import_round_trip_bit_exact(tmp_path, dtype: torch.dtype) -> None:
    layout = _layout(dtype)
    with _store(layout, tmp_path / "a") as src:  # 21 chunks, 8 host slots: most come from disk
        _fill(src, 7, 5)
        _fill(src, 8, 2)
        export_sequence(src, 7, tmp_path / "snap")
    meta = read_snapshot_layout(tmp_path / "snap")
    assert meta["fingerprint"] == layout.fingerprint() and meta["num_chunks"] == 5 and meta["seq_id"] == 7
    with _store(layout, tmp_path / "b") as dst:
        assert import_sequence(dst, tmp_path / "snap", seq_id=3) == 15
        out = torch.empty(1, *layout.chunk_shape, dtype=dtype)
        for layer in range(3):
            for c in range(5):
                assert dst.read([ChunkKey(3, layer, c)], out) == []
                assert torch.equal(
                    out[0].view(torch.int16), _chunk(layout, 100 * layer + c).view(torch.int16)
                )


def test_bfloat16_is_native_and_zarr_python_reads_it(tmp_path) -> None:
    import ml_dtypes
    import zarr

    layout = _layout()
    with _store(layout) as src:
        _fill(src, 1, 2)
        export_sequence(src, 1, tmp_path / "snap")
    meta_json = (tmp_path / "snap" / "zarr.json").read_text()
    assert '"data_type": "bfloat16"' in meta_json or '"data_type":"bfloat16"' in meta_json
    register_zarr_bfloat16()
    arr = zarr.open_array(str(tmp_path / "snap"), mode="r")
    assert arr.dtype == np.dtype(ml_dtypes.bfloat16) and arr.shape == (3, 2, *layout.chunk_shape)
    assert arr.attrs["kvtier"]["fingerprint"] == layout.fingerprint()
    got = torch.from_numpy(np.asarray(arr[2, 1]).view(np.int16))
    assert torch.equal(got, _chunk(layout, 201).view(torch.int16))


def test_import_refuses_another_layout(tmp_path) -> None:
    with _store(_layout()) as src:
        _fill(src, 1, 1)
        export_sequence(src, 1, tmp_path / "snap")
    other = KVLayout(
        num_layers=3, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16, chunk_size=2, group_size=2
    )
    with _store(other) as dst:
        with pytest.raises(LayoutMismatchError, match="expected layout fingerprint"):
            import_sequence(dst, tmp_path / "snap")
        assert len(dst) == 0


def test_export_bad_inputs(tmp_path) -> None:
    with _store(_layout()) as src:
        with pytest.raises(SnapshotError, match="expected a stored sequence"):
            export_sequence(src, 9, tmp_path / "x")
        src.write((1, 0, 0), _chunk(src.layout, 0))
        with pytest.raises(SnapshotError, match="got 2 missing"):
            export_sequence(src, 1, tmp_path / "x")
        (tmp_path / "y").mkdir()
        with pytest.raises(FileExistsError, match="expected a new folder"):
            export_sequence(src, 1, tmp_path / "y")


def test_store_api_is_reexported() -> None:
    import kvtier

    assert kvtier.export_sequence is export_sequence and kvtier.import_sequence is import_sequence


# ---------------------------------------------------------------- issue 10, case 5: hostile snapshots
@pytest.fixture
def snap(tmp_path):
    """A fp16 snapshot of sequence 7: 3 layers x 2 chunks."""
    layout = _layout(torch.float16)
    with _store(layout) as src:
        _fill(src, 7, 2)
        export_sequence(src, 7, tmp_path / "snap")
    return layout, tmp_path / "snap"


def _edit_meta(path, **changes) -> None:
    meta = json.loads((path / "zarr.json").read_text())
    meta.update(changes)
    (path / "zarr.json").write_text(json.dumps(meta))


def _refused(layout, path, match: str, **kw) -> None:
    with _store(layout) as dst:
        dst.write((99, 0, 0), _chunk(layout, 5))
        with pytest.raises(SnapshotError, match=match):
            import_sequence(dst, path, **kw)
        assert dst.keys() == [ChunkKey(99, 0, 0)]  # nothing was written, nothing evicted


def test_missing_chunk_file_is_refused(snap) -> None:
    layout, path = snap
    os.remove(path / "c" / "1" / "1" / "0" / "0" / "0" / "0")
    _refused(layout, path, r"expected every chunk file present, got chunk \(1, 1\) missing")


def test_declared_shape_larger_than_what_is_on_disk_is_refused(snap) -> None:
    layout, path = snap
    meta = json.loads((path / "zarr.json").read_text())
    meta["shape"][1] = 2_000_000
    meta["attributes"]["kvtier"]["num_chunks"] = 2_000_000
    (path / "zarr.json").write_text(json.dumps(meta))
    _refused(layout, path, "expected at most .* chunks .the store's host and disk slots., got 6000000")


def test_declared_shape_that_fits_but_lacks_files_is_refused(snap) -> None:
    layout, path = snap
    meta = json.loads((path / "zarr.json").read_text())
    meta["shape"][1] = 3
    meta["attributes"]["kvtier"]["num_chunks"] = 3
    (path / "zarr.json").write_text(json.dumps(meta))
    _refused(layout, path, r"got chunk \(0, 2\) missing")


@pytest.mark.parametrize("data_type", ["bfloat16", "int16"])
def test_other_data_type_is_refused(snap, data_type) -> None:
    layout, path = snap
    _edit_meta(path, data_type=data_type)
    _refused(layout, path, f"expected data_type float16, got '{data_type}'")


def test_compressed_codec_is_refused(snap) -> None:
    layout, path = snap
    _edit_meta(path, codecs=[{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "gzip"}])
    _refused(layout, path, "expected codecs")


def test_chunk_file_symlinked_outside_is_refused(snap, tmp_path) -> None:
    layout, path = snap
    target = path / "c" / "0" / "1" / "0" / "0" / "0" / "0"
    outside = tmp_path / "secret.bin"
    outside.write_bytes(target.read_bytes())
    target.unlink()
    target.symlink_to(outside)
    _refused(layout, path, "expected no symlinks")


def test_truncated_chunk_file_is_refused(snap) -> None:
    layout, path = snap
    f = path / "c" / "2" / "0" / "0" / "0" / "0" / "0"
    f.write_bytes(f.read_bytes()[:-2])
    _refused(layout, path, r"expected chunk \(2, 0\) a file of 256 bytes, got 254 bytes")


def test_existing_sequence_is_kept_unless_overwrite(snap) -> None:
    layout, path = snap
    with _store(layout) as dst:
        dst.write((7, 0, 0), _chunk(layout, 555))
        dst.write((7, 0, 5), _chunk(layout, 556))
        with pytest.raises(SnapshotError, match="got 7 with 2 chunks .pass overwrite=True"):
            import_sequence(dst, path)
        out = torch.empty(1, *layout.chunk_shape, dtype=layout.dtype)
        assert dst.read([(7, 0, 0)], out) == [] and torch.equal(out[0], _chunk(layout, 555))
        assert import_sequence(dst, path, overwrite=True) == 6
        assert not dst.contains((7, 0, 5))  # replaced whole, not merged
        assert dst.read([(7, 2, 1)], out) == [] and torch.equal(out[0], _chunk(layout, 201))
