"""Property-based fuzzing of every parser of user files: safetensors headers, sharded indexes,
direction.json and adapter_config.json. Whatever the bytes, a parser returns or raises a CwsError
(one line for the CLI); never any other exception, never a hang. Bounded to seconds, reproducible."""

import json
import math
import struct
import tempfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("hypothesis")  # the test extra installs it
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from cws.errors import CwsError
from cws.io.checkpoint import Checkpoint
from cws.io.direction import Direction
from cws.io.format import read_header
from cws.io.lora import Adapter

FUZZ = settings(
    max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.sampled_from(
        ["F32", "BF16", "F16", "I64", "U8", "BOOL", "F8_E4M3", "lowrank", "dense", "LORA", ".*", "(", "[a-", "q_proj"]
    ),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=20,
)


def deep(n: int) -> str:
    """JSON nested n levels deep (the parsers' recursion limit must become a CwsError)."""
    return "[" * n + "]" * n


def _dump(obj) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


def documents(fields: dict):
    """Raw bytes of a JSON document: mostly objects with the parser's own keys and hostile values,
    sometimes any JSON value, absurd nesting, or bytes that are not UTF-8."""
    shaped = st.fixed_dictionaries({}, optional={k: st.one_of(v, json_values) for k, v in fields.items()})
    return st.one_of(
        shaped.map(_dump),
        json_values.map(_dump),
        st.integers(1000, 100000).map(lambda n: deep(n).encode()),
        st.binary(max_size=64),
        st.just(b'\xff\xfe{"a": 1}'),
    )


def expect_cws_error_only(fn) -> None:
    try:
        fn()
    except CwsError as e:
        assert "\n" not in str(e), str(e)


# ---------------------------------------------------------------------- safetensors header

entry = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.one_of(st.sampled_from(["F32", "BF16", "U8"]), scalars),
        "shape": st.one_of(st.lists(st.integers(-2, 2**40), max_size=3), scalars),
        "data_offsets": st.one_of(st.lists(st.integers(-8, 2**40), max_size=3), scalars),
    },
)
headers = st.one_of(
    st.dictionaries(
        st.one_of(st.text(max_size=6), st.just("__metadata__")), st.one_of(entry, json_values), max_size=4
    ).map(_dump),
    json_values.map(_dump),
    st.integers(1000, 100000).map(lambda n: deep(n).encode()),
    st.binary(max_size=64),
)


@FUZZ
@given(header=headers, data=st.binary(max_size=64), lie=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_fuzz_safetensors_header(header, data, lie):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.safetensors"
        n = len(header) if lie is None else lie
        path.write_bytes(struct.pack("<Q", n) + header + data)
        expect_cws_error_only(lambda: read_header(path))
        expect_cws_error_only(lambda: Checkpoint.open(d))


# ---------------------------------------------------------------------- sharded index


@FUZZ
@given(
    doc=documents(
        {
            "weight_map": st.dictionaries(
                st.text(max_size=6),
                st.one_of(
                    st.sampled_from(["a.safetensors", "../a.safetensors", "", ".", "missing.safetensors"]), scalars
                ),
                max_size=3,
            ),
            "metadata": json_values,
        }
    )
)
def test_fuzz_index(doc):
    with tempfile.TemporaryDirectory() as d:
        save_file({"w": torch.zeros(2)}, str(Path(d) / "a.safetensors"))
        (Path(d) / "model.safetensors.index.json").write_bytes(doc)
        expect_cws_error_only(lambda: Checkpoint.open(d))


# ---------------------------------------------------------------------- direction.json

spec = st.fixed_dictionaries(
    {},
    optional={
        "kind": st.one_of(st.sampled_from(["dense", "lowrank"]), scalars),
        "shape": st.one_of(st.just([2, 3]), st.lists(st.integers(-1, 4), max_size=3), scalars),
        "scale": st.one_of(st.floats(allow_nan=True), scalars),
        "rank": scalars,
    },
)


@FUZZ
@given(
    doc=documents(
        {
            "format": st.sampled_from(["cws-direction", "other"]),
            "version": st.one_of(st.integers(-1, 3), scalars),
            "tensors": st.dictionaries(st.sampled_from(["w", "v", "x"]), st.one_of(spec, json_values), max_size=3),
            "omitted": json_values,
            "sources": json_values,
        }
    )
)
def test_fuzz_direction_json(doc):
    with tempfile.TemporaryDirectory() as d:
        save_file(
            {"w": torch.zeros(2, 3), "v@B": torch.ones(2, 1), "v@A": torch.ones(1, 3)},
            str(Path(d) / "direction.safetensors"),
        )
        (Path(d) / "direction.json").write_bytes(doc)
        expect_cws_error_only(lambda: Direction.open(d))


# ---------------------------------------------------------------------- adapter_config.json

numbers = st.one_of(
    st.sampled_from([0, -1, 1, 2, 4, 1e308, -1e308, 2**70, "four", "16", None, True, [4], {"r": 4}]),
    st.floats(allow_nan=True),
)
regexes = st.one_of(
    st.sampled_from(["q_proj", ".*", "(", "[a-", "*", "a{99999999999}", "(?P<x", "layers.0.q_proj"]),
    st.text(max_size=6),
)


@FUZZ
@given(
    doc=documents(
        {
            "peft_type": st.one_of(st.sampled_from(["LORA", "lora", "IA3"]), scalars),
            "r": numbers,
            "lora_alpha": numbers,
            "use_rslora": st.booleans(),
            "rank_pattern": st.one_of(st.dictionaries(regexes, numbers, max_size=2), scalars),
            "alpha_pattern": st.one_of(st.dictionaries(regexes, numbers, max_size=2), scalars),
            "fan_in_fan_out": scalars,
            "use_dora": scalars,
            "target_modules": json_values,
        }
    )
)
def test_fuzz_adapter_config(doc):
    with tempfile.TemporaryDirectory() as d:
        pre = "base_model.model.model.layers.0.self_attn.q_proj"
        save_file(
            {f"{pre}.lora_A.weight": torch.ones(4, 8), f"{pre}.lora_B.weight": torch.ones(8, 4)},
            str(Path(d) / "adapter_model.safetensors"),
        )
        (Path(d) / "adapter_config.json").write_bytes(doc)
        try:
            ad = Adapter.open(d)
        except CwsError as e:
            assert "\n" not in str(e)
            return
        for delta in ad.lora.values():  # what was accepted is usable: a rank and a finite scale
            assert delta.rank == 4 and math.isfinite(delta.scale)


def test_deep_nesting_in_every_parser(tmp_path):
    """The cases the issue found, spelled out: 100k-deep JSON in each file cws parses."""
    (tmp_path / "h").mkdir()
    body = deep(100000).encode()
    (tmp_path / "h" / "x.safetensors").write_bytes(struct.pack("<Q", len(body)) + body)
    for d, name in (("i", "model.safetensors.index.json"), ("w", "direction.json"), ("a", "adapter_config.json")):
        (tmp_path / d).mkdir()
        save_file(
            {"w": torch.zeros(2)},
            str(
                tmp_path
                / d
                / (
                    "adapter_model.safetensors"
                    if d == "a"
                    else "direction.safetensors"
                    if d == "w"
                    else "a.safetensors"
                )
            ),
        )
        (tmp_path / d / name).write_text(deep(100000))
    for fn, d in ((Checkpoint.open, "h"), (Checkpoint.open, "i"), (Direction.open, "w"), (Adapter.open, "a")):
        try:
            fn(tmp_path / d)
        except CwsError as e:
            assert "nested too deeply" in str(e), str(e)
        else:
            raise AssertionError(f"{d}: accepted")
