"""The stated bounds of :mod:`retr.limits`: JSON/TOML nesting and model sizes."""

from __future__ import annotations

import json
import tomllib

import pytest
import torch

from retr.config import flat_dict, load_toml
from retr.errors import ConfigError
from retr.limits import (
    MAX_JSON_DEPTH,
    check_model_size,
    estimate_parameters,
    json_loads,
    toml_loads,
)
from retr.models import build_model, config_class


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_json_nesting_up_to_the_limit_parses() -> None:
    assert json_loads(_nested(MAX_JSON_DEPTH)) == json.loads(_nested(MAX_JSON_DEPTH))
    assert json_loads('{"a": ' + _nested(MAX_JSON_DEPTH - 1) + "}")["a"] == \
        json.loads(_nested(MAX_JSON_DEPTH - 1))
    many = "[" + ",".join(["[1]"] * 10_000) + "]"  # many brackets, depth 2
    assert len(json_loads(many)) == 10_000


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 900, 200_000])
def test_json_nesting_over_the_limit_is_a_decode_error(depth: int) -> None:
    with pytest.raises(json.JSONDecodeError, match=f"nested deeper than {MAX_JSON_DEPTH} levels"):
        json_loads(_nested(depth))
    with pytest.raises(json.JSONDecodeError, match="nested deeper"):
        json_loads(('{"a":' * depth + "1" + "}" * depth).encode())


def test_toml_nesting_is_bounded(tmp_path) -> None:
    with pytest.raises(tomllib.TOMLDecodeError, match="nested deeper"):
        toml_loads("a = " + _nested(200_000))
    assert toml_loads("a = " + _nested(3)) == {"a": [[[]]]}
    path = tmp_path / "deep.toml"
    path.write_text("[model]\nx = " + "{y = " * 100_000 + "1" + "}" * 100_000 + "\n")
    with pytest.raises(ConfigError, match=r"deep.toml: invalid TOML \(nested deeper than 64"):
        load_toml(path)


@pytest.mark.parametrize("name, fields", [
    ("retr", {}), ("retr", {"hidden_size": 32, "num_heads": 2, "num_layers": 3}),
    ("sasrec", {}), ("sasrec", {"attention": "pathway"}), ("bert4rec", {}),
    ("bert4rec", {"attention": "pathway", "num_layers": 3}), ("gru4rec", {}),
    ("gru4rec", {"num_layers": 3, "hidden_size": 32}),
])
def test_parameter_estimate_is_within_ten_percent(name: str, fields: dict[str, object]) -> None:
    torch.manual_seed(0)
    cfg = config_class(name)(**fields)
    real = sum(p.numel() for p in build_model(name, 3000, cfg).parameters())
    estimate = check_model_size(name, 3000, flat_dict(cfg))
    assert 0.9 <= estimate / real <= 1.1, (estimate, real)


@pytest.mark.parametrize("key, value, message", [
    ("hidden_size", 10**9, "model.hidden_size = 1,000,000,000 is over the limit of 65,536"),
    ("ffn_size", 10**7, "model.ffn_size = 10,000,000 is over the limit"),
    ("max_len", 10**9, "model.max_len = 1,000,000,000 is over the limit of 65,536 positions"),
    ("num_layers", 10**6, "model.num_layers = 1,000,000 is over the limit of 256"),
])
def test_absurd_sizes_are_refused_before_building(key: str, value: int, message: str) -> None:
    fields = {**flat_dict(config_class("retr")()), key: value}
    with pytest.raises(ConfigError, match=message):
        check_model_size("retr", 100, fields)


def test_weights_that_do_not_fit_in_memory_are_refused() -> None:
    fields = flat_dict(config_class("sasrec")(hidden_size=4096, num_heads=4))
    params = estimate_parameters(10**6, hidden_size=4096, num_layers=2, max_len=200,
                                 ffn_size=4096)
    with pytest.raises(ConfigError, match=r"about [\d,]+ parameters \(16\.0 GiB of weights\) "
                                          r"for 1,000,000 items, more than the 8\.0 GiB"):
        check_model_size("sasrec", 10**6, fields, memory_bytes=8 * 2**30)
    assert check_model_size("sasrec", 10**6, fields, memory_bytes=64 * 2**30) == params


def test_build_model_checks_before_allocating() -> None:
    cfg = config_class("gru4rec")(num_layers=10**6)
    with pytest.raises(ConfigError, match="model.num_layers = 1,000,000"):
        build_model("gru4rec", 10, cfg)


def test_streamed_logs_must_fit_in_memory() -> None:
    from retr.errors import DataError
    from retr.limits import check_rows

    check_rows(10**8, "log.parquet", memory_bytes=8 * 2**30)  # 4 GB needed: fits
    with pytest.raises(DataError, match=r"log.parquet: 1,000,000,000 rows need about 37.3 GiB "
                                        r"to read \(40 bytes a row\), more than the 8.0 GiB"):
        check_rows(10**9, "log.parquet", memory_bytes=8 * 2**30)
