"""offload.sizes: one parser and one formatter of sizes, and the callers that read sizes through it."""

from __future__ import annotations

import pytest

import offload
from offload.schedulers.gridengine import _mb as qhost_mib
from offload.sizes import format_size, parse_size
from offload.spec import parse_memory


@pytest.mark.parametrize(
    ("text", "binary", "decimal"),
    [
        ("512", 512, 512),
        ("4K", 4 * 2**10, 4000),
        ("4k", 4 * 2**10, 4000),
        ("500M", 500 * 2**20, 500 * 10**6),
        ("500 MB", 500 * 2**20, 500 * 10**6),
        ("1.5GB", 3 * 2**29, 1_500_000_000),
        ("2GiB", 2**31, 2**31),
        ("2Gi", 2**31, 2**31),
        ("1.1gb", 1_181_116_007, 1_100_000_000),  # exact, no float noise: 1.1e9 is not 1100000000.0000002
        ("3T", 3 * 2**40, 3 * 10**12),
        ("1P", 2**50, 10**15),
        ("2e9", 2_000_000_000, 2_000_000_000),
        (".5K", 512, 500),
        ("10B", 10, 10),
    ],
)
def test_one_parser_reads_both_rules(text, binary, decimal):
    assert parse_size(text) == binary  # SLURM's, Grid Engine's and offload's own: a prefix is a power of 1024
    assert parse_size(text, binary=False) == decimal  # Kubernetes' and Dask's: with i 1024, without 1000


def test_a_bare_number_counts_the_callers_unit_and_a_part_of_a_byte_is_a_whole_one():
    assert parse_size("64", unit=2**20) == 64 * 2**20
    assert parse_size(64, unit=2**20) == 64 * 2**20
    assert parse_size("1.5") == 2
    assert parse_size("0") == 0


@pytest.mark.parametrize("bad", ["", "lots", "-1G", "4X", "1.2.3", "G", "4 G B", "1E", True])
def test_what_is_not_a_size_is_a_value_error(bad):
    with pytest.raises(ValueError, match="not a size"):
        parse_size(bad)


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1536, "1.5 KiB"),
        (20 * 2**20, "20.0 MiB"),
        (int(3.2 * 2**30), "3.2 GiB"),
        (5 * 2**40, "5.0 TiB"),
        (3 * 2**60, "3072.0 PiB"),
    ],
)
def test_one_formatter(size, text):
    assert format_size(size) == text


def test_memory_requests_keep_their_rule_and_their_words():
    assert [parse_memory(t) for t in ("4G", "4g", "500M", "1.5GB", "2GiB", "100", "1T")] == [
        4096, 4096, 500, 1536, 2048, 100, 2**20,
    ]  # fmt: skip
    assert parse_memory("1500K") == 2  # a part of a megabyte is a whole one: a request never shrinks
    with pytest.raises(offload.ConfigError, match=r"memory 'lots' is not a size: use e.g. '4G', '500M' or '1T'"):
        parse_memory("lots")
    with pytest.raises(offload.ConfigError, match=r"memory '0G' is zero: give a positive size such as '1G'"):
        parse_memory("0G")


def test_qhost_memory_in_mib():
    assert [qhost_mib(t) for t in ("23.5G", "512.0M", "1048576", "-", "")] == [int(23.5 * 1024), 512, 1, 0, 0]


def test_the_cli_refuses_a_max_size_that_is_not_one(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from offload.cli import main

    monkeypatch.setenv("OFFLOAD_CONFIG", str(tmp_path / "none.toml"))
    result = CliRunner().invoke(main, ["image", "prune", "--max-size", "lots"])
    assert result.exit_code != 0 and "--max-size 'lots': give a size such as 500M or 50G" in result.output


def test_dask_memory_is_read_as_dask_reads_it():
    dask_utils = pytest.importorskip("dask.utils")
    from dask_offload.options import memory_bytes

    for text in ("800MB", "8GB", "1GiB", "12GB", "1.5kB", "5e9", "100 MB", "2gb", 8_000_000_000):
        assert memory_bytes(text) == dask_utils.parse_bytes(text), text


def test_kubernetes_quantities_keep_their_case():
    from interlink_offload.pods import _quantity_bytes

    assert [_quantity_bytes(q) for q in ("512Mi", "2Gi", "1G", "500k", "1000")] == [
        512 * 2**20, 2**31, 10**9, 500_000, 1000,
    ]  # fmt: skip
    for bad in ("400m", "1gi", "2GB"):  # "m" is a thousandth in Kubernetes: not read as mega
        with pytest.raises(offload.ConfigError, match="not one Kubernetes knows"):
            _quantity_bytes(bad)
