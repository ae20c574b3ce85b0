"""Argument checks shared by the tree and the ops: each error names the argument, the
expectation and what came."""

from __future__ import annotations


def check_int(name: str, value: object, *, minimum: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_power_of_two(name: str, value: object, *, maximum: int | None = None,
                       maximum_name: str = "tree.ball_size") -> int:
    check_int(name, value)
    if value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum_name} = {maximum}, got {value}")
    return value
