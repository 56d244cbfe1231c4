"""Logical axis names, the rules table that maps them onto a (data, fsdp, tensor) mesh,
and the checks that run before anything compiles.

Every parameter carries logical axis names in its ``out_sharding`` metadata (see
``model.py``); activations are constrained with :func:`constrain`. A rules table is a
tuple of ``(logical_name, mesh_axes)`` pairs, so it is hashable and can sit in a
module's static graph: the reference and the guidance model may use different tables.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")


# logical name -> mesh axis (or tuple of axes, or None = replicated)
DEFAULT_RULES: tuple = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("cache_length", None),
    ("act_embed", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("candidates", None),
    ("atoms", None),
    ("norm", None),
)


class MeshError(ValueError):
    """The mesh does not fit the model or the batch."""


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types; one axis may be -1 (use the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1.")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {len(devices)} devices.")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise MeshError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {int(np.prod(sizes))} devices, "
            f"but {len(devices)} are available: change the mesh sizes so their product is {len(devices)} "
            "(or set one of them to -1)."
        )
    arr = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def single_device_mesh() -> Mesh:
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def _rules_dict(rules: Iterable) -> dict:
    return {name: axes for name, axes in rules}


def logical_to_spec(logical: Sequence[str | None] | None, rules: Iterable = DEFAULT_RULES) -> P:
    """Map logical axis names to a PartitionSpec; a mesh axis is used at most once."""
    if logical is None:
        return P()
    table = _rules_dict(rules)
    used: set = set()
    out = []
    for name in logical:
        axes = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise MeshError(f"logical axis {name!r} has no rule; add ({name!r}, mesh_axes) to the rules table.")
        if axes is None:
            out.append(None)
            continue
        axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
        axes_t = tuple(a for a in axes_t if a not in used)
        used.update(axes_t)
        out.append(axes_t[0] if len(axes_t) == 1 else (axes_t or None))
    return P(*out)


def _axis_size(mesh: Mesh, entry) -> int:
    if entry is None:
        return 1
    names = (entry,) if isinstance(entry, str) else entry
    return int(np.prod([mesh.shape[n] for n in names]))


def named_sharding(
    mesh: Mesh, logical, rules: Iterable = DEFAULT_RULES, shape: Sequence[int] | None = None, what: str = "array"
) -> NamedSharding:
    spec = logical_to_spec(logical, rules)
    if shape is not None:
        for dim, (size, entry) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape))):
            n = _axis_size(mesh, entry)
            if size % n:
                lname = logical[dim] if logical else None
                raise MeshError(
                    f"{what}: dimension {dim} ({lname}) has size {size}, not divisible by mesh axes {entry} "
                    f"of size {n}; change the mesh (e.g. make {entry} divide {size}) or map {lname!r} to "
                    "another mesh axis in the rules."
                )
    return NamedSharding(mesh, spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Iterable = DEFAULT_RULES):
    """NamedShardings for an NNX state (concrete or abstract), from its logical metadata."""
    logical = nnx.get_partition_spec(state)

    def one(path, var, spec):
        value = var.get_value() if hasattr(var, "get_value") else var
        names = tuple(spec) if spec is not None else None
        return named_sharding(
            mesh,
            names,
            rules,
            shape=getattr(value, "shape", None),
            what="parameter " + "/".join(str(getattr(k, "key", k)) for k in path),
        )

    return jax.tree.map_with_path(one, state, logical, is_leaf=lambda x: isinstance(x, nnx.Variable))


def check_model_fits(
    cfg, mesh: Mesh, rules: Iterable = DEFAULT_RULES, batch: int | None = None, name: str = "model"
) -> None:
    """Fail early, before compiling, if the mesh cannot split heads / kv heads / batch."""
    table = _rules_dict(rules)
    checks = [
        ("q_heads", cfg.num_heads, "num_attention_heads"),
        ("kv_heads", cfg.num_kv_heads, "num_key_value_heads"),
        ("mlp", cfg.intermediate_size, "intermediate_size"),
        ("vocab", cfg.vocab_size, "vocab_size"),
        ("embed", cfg.hidden_size, "hidden_size"),
    ]
    if batch is not None:
        checks.append(("batch", batch, "batch size"))
    for logical, size, label in checks:
        axes = table.get(logical)
        n = _axis_size(mesh, axes)
        if size % n:
            raise MeshError(
                f"{name}: {label}={size} is not divisible by mesh axis {axes!r} of size {n} "
                f"(mesh {dict(mesh.shape)}); change the {axes!r} mesh size to a divisor of {size}, "
                f"or map {logical!r} to None in the sharding rules."
            )


def constrain(x: jax.Array, logical: Sequence[str | None], rules: Iterable | None):
    """with_sharding_constraint by logical names, when a mesh is active; a no-op otherwise."""
    if rules is None:
        return x
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical, rules))
