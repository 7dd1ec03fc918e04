"""Attention policies by name, and their parameters from JSON (--attention-policy-config, a request's
"attention_policy" object)."""
from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import fields
from typing import Any

from afdserve.kernels.attention.sparse.delta import DeltaPolicy
from afdserve.kernels.attention.sparse.hyper import HyperAttentionPolicy
from afdserve.kernels.attention.sparse.policy import AttendedTokens, AttentionPolicy, KVLayout, PolicyState
from afdserve.kernels.attention.sparse.prflash import PrFlashPolicy
from afdserve.kernels.attention.sparse.quest import QuestPolicy
from afdserve.kernels.attention.sparse.sparsed import SparseDPolicy

POLICIES: dict[str, type[AttentionPolicy]] = {
    "dense": AttentionPolicy, "quest": QuestPolicy, "delta": DeltaPolicy, "prflash": PrFlashPolicy,
    "hyperattention": HyperAttentionPolicy, "sparsed": SparseDPolicy}
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
    """A new policy (not yet bound to a cache), its parameters checked: an unknown name or key, or a value of the
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


def policy_spec(spec: str | dict | None, default: dict | None = None) -> dict | None:
    """A request's "attention_policy" ({"name": ..., parameters...}, or its JSON text) checked and normalized (the
    parameters as their types); None: `default`. Errors name the field: "attention_policy ..."."""
    if spec is None:
        return default
    try:
        params = parse_policy_params(spec)
        name = params.pop("name", None)
        if not isinstance(name, str):
            raise ValueError(f"needs a \"name\": one of {', '.join(POLICY_NAMES)}")
        policy = make_policy(name, params)
    except ValueError as e:
        raise ValueError(f"attention_policy {e}") from None
    return {"name": name, **{key: getattr(policy, key) for key in params}}


def _checked(policy: str, key: str, value: Any, default: Any) -> Any:
    """value, as the type the parameter's default has (an int for a float is fine; a list for a tuple of ints)."""
    if key == "full_layers":
        if value is None or (isinstance(value, (list, tuple)) and all(type(i) is int for i in value)):
            return None if value is None else tuple(value)
    elif isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif isinstance(default, int):
        if type(value) is int:
            return value
    expected = ("a list of layer numbers" if key == "full_layers" else "a finite number"
                if isinstance(default, float) else type(default).__name__)
    raise ValueError(f"attention policy {policy!r}: {key} must be {expected}, got {value!r}")


class AttentionPolicies:
    """The policies a runner serves: the engine's default and any a request names, each built on first use; one
    state per kind, shared by the policies of that kind."""
    MAX_CACHED = 64  # distinct parameter sets kept; a policy is a few numbers, rebuilt if evicted

    def __init__(self, layout: KVLayout, kv_caches: list):
        self.layout, self.kv_caches = layout, kv_caches
        self.states: dict[type, PolicyState] = {}
        self.stats: AttendedTokens | None = None  # set to count the tokens sparse decodes read (bench sparse)
        self.policies: OrderedDict[str, AttentionPolicy | None] = OrderedDict()

    def get(self, spec: dict) -> AttentionPolicy | None:
        """The policy of spec {"name": ..., parameters...} (checked when the request was made); None for dense."""
        key = json.dumps(spec, sort_keys=True)
        if key in self.policies:
            self.policies.move_to_end(key)
            return self.policies[key]
        params = {k: v for k, v in spec.items() if k != "name"}
        policy = make_policy(spec["name"], params) if spec["name"] != "dense" else None
        if policy is not None:
            state = None
            if policy.state_type is not None:
                if policy.state_type not in self.states:
                    self.states[policy.state_type] = policy.state_type(self.layout, self.kv_caches)
                state = self.states[policy.state_type]
            policy.bind(self.layout, state)
        self.policies[key] = policy
        if len(self.policies) > self.MAX_CACHED:
            self.policies.popitem(last=False)
        return policy
