"""The benchmark scripts' own logic that decides what a measurement is labelled as."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _script(name: str):
    """bench/NAME.py as a module (the process's TF32 switches, which a script may set, left as they were)."""
    import torch
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def test_flash_bench_settings_parse_into_module_attributes():
    # `bench_flash_shaped.py --settings`: named sets of module attributes (tuples with commas inside),
    # the empty set, and a clear error for every malformed set
    from dsv4 import ops
    from dsv4.kernels import sparse_attention as sa
    parse = _script("bench_flash_shaped").parse_settings
    got = parse("base:;m2:dsv4.kernels.sparse_attention.MERGE=(2, 256),dsv4.ops.HC_DEFER_TOKENS=15")
    assert got == [("base", {}), ("m2", {(sa, "MERGE"): (2, 256), (ops, "HC_DEFER_TOKENS"): 15})]
    assert parse(None) == [("", {})]
    for bad, says in (("x:dsv4.nonexistent.A=1", "No module"), ("x:dsv4.ops.NOPE=1", "no attribute"),
                      ("1x:dsv4.ops.HC_DEFER_TOKENS=1", "NAME:module"), ("x:dsv4.ops.HC_DEFER_TOKENS=foo", "literal"),
                      ("x:HC=1", "module.ATTR=VALUE"), ("nocolon", "NAME:module")):
        with pytest.raises(SystemExit, match=says):
            parse(bad)
