"""Attention policies by name, and their parameters from JSON (--attention-policy-config, a request's
"attention_policy" object)."""
from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

from afdserve.kernels.attention.sparse.delta import DeltaPolicy
from afdserve.kernels.attention.sparse.policy import AttentionPolicy
from afdserve.kernels.attention.sparse.prflash import PrFlashPolicy
from afdserve.kernels.attention.sparse.quest import QuestPolicy

POLICIES: dict[str, type[AttentionPolicy]] = {
    "dense": AttentionPolicy, "quest": QuestPolicy, "delta": DeltaPolicy, "prflash": PrFlashPolicy}
POLICY_NAMES = tuple(POLICIES)


def parse_policy_params(text: str | dict | None) -> dict[str, Any]:
    """A policy's parameters, from a JSON object (text) or a dict; None: no parameters."""
    if text is None:
        return {}
    if isinstance(text, str):
        try:
            text = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"attention policy config is not JSON ({e.msg}): {text!r}") from None
    if not isinstance(text, dict):
        raise ValueError(f"attention policy config must be a JSON object, got {type(text).__name__}")
    return dict(text)


def make_policy(name: str, params: str | dict | None = None) -> AttentionPolicy:
    """A new policy (its state not yet allocated), its parameters checked: an unknown name or key, or a value of the
    wrong type, is a ValueError naming it."""
    if name not in POLICIES:
        raise ValueError(f"unknown attention policy {name!r}; known: {', '.join(POLICY_NAMES)}")
    params = parse_policy_params(params)
    policy_class = POLICIES[name]
    known = {f.name: f for f in fields(policy_class)} if policy_class is not AttentionPolicy else {}
    unknown = sorted(params.keys() - known.keys())
    if unknown:
        accepted = ", ".join(known) or "none"
        raise ValueError(f"attention policy {name!r} has no parameter(s) {', '.join(unknown)}; it takes: {accepted}")
    for key, value in params.items():
        params[key] = _checked(name, key, value, known[key].default)
    return policy_class(**params)


def _checked(policy: str, key: str, value: Any, default: Any) -> Any:
    """value, as the type the parameter's default has (an int for a float is fine; a list for a tuple of ints)."""
    if key == "full_layers":
        if value is None or (isinstance(value, (list, tuple)) and all(type(i) is int for i in value)):
            return None if value is None else tuple(value)
    elif isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, int):
        if type(value) is int:
            return value
    expected = "a list of layer numbers" if key == "full_layers" else type(default).__name__
    raise ValueError(f"attention policy {policy!r}: {key} must be {expected}, got {value!r}")
