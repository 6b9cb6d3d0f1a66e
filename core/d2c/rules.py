"""Value rules for one-line config errors: each a predicate, paired with its `allowed:` text
where it is used (d2c.sampling.SamplerConfig, the harness's RULES)."""
from __future__ import annotations


def int_min(lo: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo


def number(ok):
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and ok(v)


def or_null(check):
    return lambda v: v is None or check(v)


def one_of(options):
    return lambda v: v in options


def boolean(v) -> bool:
    return isinstance(v, bool)
