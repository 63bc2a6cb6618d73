"""A training run's optimizer, schedule and RNG states as JSON plus a safetensors file.

A run folder may come from elsewhere, and a pickle in it would run code on resume, so the
state dicts are written as tensors (safetensors) and JSON only, and read back into the same
shapes; anything else is refused at save, so what is written always reads back.
"""

from __future__ import annotations

import torch

# How split_state marks in JSON what JSON has no form of: a tensor (kept in the safetensors file
# under this name), a tuple, a dict whose keys are not all strings (AdamW's state is by index)
TENSOR, TUPLE, ITEMS = "__tensor__", "__tuple__", "__items__"


def split_state(value, tensors: dict[str, torch.Tensor], name: str):
    """`value` (state dicts: tensors, numbers, strings, None, lists, tuples, dicts) as JSON,
    its tensors moved into `tensors`; anything else is refused, so what is written reads back."""
    if isinstance(value, torch.Tensor):
        if name in tensors:
            raise TypeError(f"two tensors of a checkpoint would share the name {name}")
        tensors[name] = value.detach().cpu().contiguous()
        return {TENSOR: name}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple):
        return {TUPLE: [split_state(v, tensors, _child(name, i)) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [split_state(v, tensors, _child(name, i)) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not {TENSOR, TUPLE, ITEMS} & set(value):
            return {k: split_state(v, tensors, _child(name, k)) for k, v in value.items()}
        return {ITEMS: [[k, split_state(v, tensors, _child(name, k))] for k, v in value.items()]}
    raise TypeError(f"a checkpoint cannot hold a {type(value).__name__} ({name})")


def _child(name: str, key: object) -> str:
    return f"{name}.{key}" if name else str(key)


def join_state(value, tensors: dict[str, torch.Tensor]):
    """What split_state wrote, put back together (ValueError for what it never writes)."""
    if isinstance(value, list):
        return [join_state(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {TENSOR}:
        if value[TENSOR] not in tensors:
            raise ValueError(f"tensor {value[TENSOR]!r} is missing")
        return tensors[value[TENSOR]]
    if set(value) == {TUPLE}:
        return tuple(join_state(v, tensors) for v in value[TUPLE])
    if set(value) == {ITEMS}:
        items = value[ITEMS]
        if not isinstance(items, list) or any(
                not isinstance(kv, list) or len(kv) != 2 or not isinstance(kv[0], int | str)
                for kv in items):
            raise ValueError("a malformed item list")
        return {k: join_state(v, tensors) for k, v in items}
    return {k: join_state(v, tensors) for k, v in value.items()}
