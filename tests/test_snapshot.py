"""Snapshots: export to zarr v3 with tensorstore, read with zarr-python, import bit-exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvtier import ChunkKey, KVLayout, LayoutMismatchError, StoreConfig, TieredStore
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
        with pytest.raises(KeyError, match="expected a stored sequence"):
            export_sequence(src, 9, tmp_path / "x")
        src.write((1, 0, 0), _chunk(src.layout, 0))
        with pytest.raises(KeyError, match="got 2 missing"):
            export_sequence(src, 1, tmp_path / "x")
        (tmp_path / "y").mkdir()
        with pytest.raises(FileExistsError, match="expected a new folder"):
            export_sequence(src, 1, tmp_path / "y")
