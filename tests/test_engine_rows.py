"""Several HGAEngines on one store (``first_seq_id``): what TieredCache runs for a padded batch (kvtier.rows).

Each engine must see only its own sequences' slot changes, write and drop only its own, and
give what it gives alone, with a host tier small enough that the rows evict each other's
chunks to disk.
"""

from __future__ import annotations

import pytest
import torch

from kvtier import HGAConfig, KVLayout, StoreConfig, TieredStore
from kvtier.engine import HGAEngine
from kvtier.reference import hga_attention as hga_ref
from kvtier.rows import RowEngines, merge_engine_stats

CFG = HGAConfig(chunk_size=16, group_size=4, sink_chunks=1, local_chunks=2, top_chunks=2, top_groups=3, fetch_groups=6)
HQ, HKV, D = 4, 2, 16
LAYOUT = KVLayout(num_layers=1, num_kv_heads=HKV, head_dim=D, dtype=torch.float32, chunk_size=16, group_size=4)


def _qkv(length: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, h, length, D, generator=g) for h in (HQ, HKV, HKV))


# kernels: under the Triton interpreter, shorter rows and a smaller host tier (seconds, not tens of seconds);
# the 1-token row decodes at position 1, where no chunk is a routing candidate yet
@pytest.mark.parametrize("backend, lengths, host_chunks", [("torch", (150, 97, 1), 10), ("kernels", (70, 20, 1), 3)])
def test_engines_sharing_a_store_equal_each_alone(backend, lengths, host_chunks, tmp_path) -> None:
    store = TieredStore(LAYOUT, StoreConfig(gpu_bytes=0, host_bytes=host_chunks * LAYOUT.chunk_bytes,
                                            disk_dir=tmp_path, device="cpu"))  # fmt: skip
    with store:
        rows = RowEngines(store, batch_size=3, hga=CFG, num_q_heads=HQ, rope_theta=1e4, backend=backend)
        inputs = [_qkv(n, seed) for seed, n in enumerate(lengths)]
        for cut in (0, 50):  # two calls per row, interleaved: rows evict each other's chunks
            for engine, (q, k, v) in zip(rows.engines, inputs):
                end = q.shape[2] if cut else 50
                if cut < min(end, q.shape[2]):
                    sl = slice(cut, min(end, q.shape[2]))
                    engine.forward(0, q[:, :, sl], k[:, :, sl], v[:, :, sl])
        assert store.stats()["disk"]["chunks"] > 0
        assert sorted({key.seq_id for key in store.keys()}) == [0, 1]  # the 1-token row closed no chunk
        for b, engine in enumerate(rows.engines):  # each engine's slot table follows only its own sequence
            table = engine.host_slots(0)
            slots = store.host_slots([(b, 0, j) for j in range(table.shape[1])])
            assert torch.equal(table[0], slots.to(table.dtype)), b
        # attend once more at the end of each row: = the reference over that row alone
        stats = []
        for b, (engine, (q, k, v)) in enumerate(zip(rows.engines, inputs)):
            q1, k1, v1 = _qkv(1, 100 + b)
            got = engine.forward(0, q1, k1, v1)
            ref, _ = hga_ref(torch.cat((q, q1), 2), torch.cat((k, k1), 2), torch.cat((v, v1), 2), config=CFG,
                             rope_theta=1e4)  # fmt: skip
            assert (got - ref[:, :, -1:]).abs().max().item() < 1e-5, b
            stats.append(engine.stats())
        merged = rows.stats()
        assert merged == merge_engine_stats(stats) | {"device_resident_bytes": merged["device_resident_bytes"]}
        assert merged["queries"] == sum(s["queries"] for s in stats)
        assert merged["tokens"] == lengths[0] + 1 and merged["row_engines"] == 3
        rows.engines[1].reset()  # drops sequence 1 only
        assert sorted({key.seq_id for key in store.keys()}) == [0]
        rows.close()
        assert store._host_watchers == [] and store._host_fences == []


def test_first_seq_id_is_checked() -> None:
    store = TieredStore(LAYOUT, StoreConfig(gpu_bytes=0, host_bytes=4 * LAYOUT.chunk_bytes, device="cpu"))
    with store, pytest.raises(ValueError, match="first_seq_id: expected an int >= 0, got -1"):
        HGAEngine(store, CFG, num_q_heads=HQ, batch_size=1, rope_theta=1e4, first_seq_id=-1)
