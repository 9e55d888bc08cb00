import pytest

from kvtier import ConfigError, HGAConfig, KVLayout, StoreConfig
from kvtier.config import format_bytes, parse_bytes
from kvtier.layout import anchor_position, num_chunks, windows_at

import torch


def test_hga_defaults_route_the_papers_budget_by_the_measured_best():
    c = HGAConfig()
    assert (c.chunk_size, c.group_size, c.sink_chunks, c.local_chunks) == (64, 16, 1, 2)
    assert (c.top_chunks, c.top_groups, c.fetch_groups, c.rope_cutoff_rad) == (48, 60, 64, 0.5)
    assert (c.chunk_score, c.group_score) == ("sum+max_group", "sum+bound")
    assert c.groups_per_chunk == 4 and c.group_key_dim(128) == 384
    p = HGAConfig.paper()
    assert (p.sink_chunks, p.local_chunks, p.top_chunks, p.top_groups) == (2, 8, 16, 32)
    assert (p.chunk_score, p.group_score) == ("sum", "sum")
    assert p.group_key_dim(128) == 128
    assert HGAConfig.paper(top_groups=8).top_groups == 8
    lean = HGAConfig.lean()
    assert lean == HGAConfig.paper(top_chunks=32) and lean.group_key_dim(64) == 64
    # Every default keeps the paper's keys per query: the sinks + the local window + the
    # current chunk + the routed groups.
    for cfg in (c, p, lean):
        assert (cfg.sink_chunks + cfg.local_chunks + 1) * 64 + cfg.top_groups * 16 == 1216


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(chunk_size=0), "chunk_size: expected an int >= 1, got 0"),
        (dict(chunk_size=64, group_size=24), "group_size: expected a divisor of chunk_size=64, got 24"),
        (dict(top_groups=65), "fetch_groups: expected >= top_groups=65, got 64"),
        (dict(sink_chunks=-1), "sink_chunks: expected an int >= 0, got -1"),
        (dict(top_chunks=2.5), "top_chunks: expected an int, got float"),
        (dict(rope_cutoff_rad=-0.1), "rope_cutoff_rad: expected a finite float >= 0"),
        (dict(rope_cutoff_rad=float("nan")), "rope_cutoff_rad: expected a finite float >= 0"),
    ],
)
def test_hga_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        HGAConfig(**kwargs)


def test_hga_config_is_frozen():
    with pytest.raises(AttributeError):
        HGAConfig().chunk_size = 32  # type: ignore[misc]


@pytest.mark.parametrize(
    "text, expected",
    [("8GiB", 8 * 2**30), ("512 MiB", 512 * 2**20), ("2GB", 2 * 10**9), ("1.5KiB", 1536), ("4096", 4096), (7, 7)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["eight", "8XB", "-1GiB", ""])
def test_parse_bytes_rejects(bad):
    with pytest.raises(ConfigError, match="expected a byte count"):
        parse_bytes(bad)


def test_parse_bytes_type_and_sign():
    with pytest.raises(TypeError, match="expected an int or a string"):
        parse_bytes(1.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="expected a byte count >= 0, got -3"):
        parse_bytes(-3)


def test_format_bytes():
    assert format_bytes(3 * 2**30) == "3.00 GiB"
    assert format_bytes(12) == "12 B"


def test_store_config_parses_and_validates(tmp_path):
    c = StoreConfig(host_bytes="2GiB", disk_dir=str(tmp_path))
    assert c.host_bytes == 2 * 2**30 and c.disk_dir == tmp_path
    with pytest.raises(ConfigError, match="io_backend: expected one of"):
        StoreConfig(io_backend="aio")
    with pytest.raises(ConfigError, match="eviction: expected one of"):
        StoreConfig(eviction="fifo")


def test_windows_never_overlap_and_cover_closed_chunks():
    for pos in range(0, 64 * 20, 7):
        for sinks in (0, 1, 2, 3):
            for local in (0, 1, 8):
                w = windows_at(pos, 64, sinks, local)
                assert w.current == pos // 64
                assert 0 <= w.sink_end <= w.local_start <= w.current
                assert w.sink_end == min(sinks, w.current)
                assert w.current - w.local_start == min(local, w.current - w.sink_end)


def test_geometry_helpers():
    assert num_chunks(0, 64) == 0 and num_chunks(1, 64) == 1 and num_chunks(65, 64) == 2
    assert anchor_position(64, 64) == 64 + 31 and anchor_position(16, 16) == 23


def test_kv_layout_sizes_and_fingerprint():
    a = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype=torch.bfloat16)
    assert a.chunk_shape == (2, 3, 64, 64)
    assert a.chunk_bytes == 2 * 3 * 64 * 64 * 2
    assert a.group_bytes == 2 * 16 * 64 * 2
    b = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype=torch.float16)
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype=torch.bfloat16).fingerprint()
    with pytest.raises(ConfigError, match="dtype: expected one of"):
        KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, dtype=torch.int8)
    with pytest.raises(ConfigError, match="group_size: expected a divisor of chunk_size=64, got 48"):
        KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, dtype=torch.float16, group_size=48)


def test_window_keys_counts_what_windows_at_describes() -> None:
    """The tensor form agrees with windows_at at every position of a few chunk geometries."""
    import torch

    from kvtier.layout import window_keys, windows_at

    for c, sinks, local in ((4, 2, 3), (16, 1, 0), (64, 0, 8)):
        positions = torch.arange(0, 40 * c + 3)
        got = window_keys(positions, c, sinks, local)
        for t in range(0, 40 * c + 3, 7):
            w = windows_at(t, c, sinks, local)
            want = (w.sink_end + w.current - w.local_start) * c + t - w.current * c + 1
            assert int(got[t]) == want
            assert want <= t + 1
