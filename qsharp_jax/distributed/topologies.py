"""TPU topologies we plan for: chip specs, how ``libtpu`` describes the slice, and mesh presets.

Per-chip numbers (bf16 dense peak, HBM capacity, HBM bandwidth) are Google Cloud's published
system-architecture figures:

* v4  (cloud.google.com/tpu/docs/v4):  275 TFLOP/s bf16, 32 GiB HBM2, 1,200 GB/s; one JAX
  device per chip (megacore), 4 chips per host.
* v5e (cloud.google.com/tpu/docs/v5e): 197 TFLOP/s bf16, 16 GiB HBM2, 819 GB/s; up to 8 chips
  on one host (v5litepod-8 is one host; larger slices are hosts of 4 chips).
* v5p (cloud.google.com/tpu/docs/v5p): 459 TFLOP/s bf16, 95 GiB HBM2e, 2,765 GB/s; one JAX
  device per chip (megacore), 4 chips per host.
* v6e (cloud.google.com/tpu/docs/v6e): 918 TFLOP/s bf16, 32 GiB HBM, 1,640 GB/s; up to 8
  chips on one host.

Slice names count TensorCores for v4/v5p (``v4-8`` = 4 chips) and chips for v5e/v6e
(``v5e-8`` = 8 chips), as the Cloud console does.

Mesh presets (``(data, fsdp, tensor)``, see ``core/sharding.py``):

* sampling (reference and guide in the decode loop): ``tensor`` = min(chips, 8) so each decode
  step reads 1/tensor of every weight matrix with no all-gather (Llama-3 8B and 3.2-1B have 8
  KV heads, so 8 is the most a KV head split allows); the rest of the chips go to ``data``
  (independent rows).
* learning (the guide's train step): everything on ``fsdp``: the batch and the parameters /
  AdamW moments are split over all chips (ZeRO-3), weights are all-gathered layer by layer.
"""

from __future__ import annotations

import dataclasses
import math
import os

GiB = 1024**3


class TopologyError(ValueError):
    """An unknown topology name, or libtpu missing where a compiled plan needs it."""


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_bf16_flops: float  # FLOP/s per JAX device
    hbm_bytes: int  # per JAX device
    hbm_bandwidth: float  # bytes/s per JAX device
    chip_config: str  # libtpu chip_config_name: "megacore" makes one device per v4/v5p chip


CHIPS = {
    "v4": Chip("v4", 275e12, 32 * GiB, 1.2e12, "megacore"),
    "v5e": Chip("v5e", 197e12, 16 * GiB, 819e9, "default"),
    "v5p": Chip("v5p", 459e12, 95 * GiB, 2.765e12, "megacore"),
    "v6e": Chip("v6e", 918e12, 32 * GiB, 1.64e12, "default"),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # Cloud slice name, e.g. "v5e-8"
    chip: Chip
    shape: tuple  # chips per dimension, e.g. (2, 4)
    host_shape: tuple  # chips per host per dimension (libtpu's chips_per_host_bounds, 3-d)

    @property
    def topology_name(self) -> str:
        """libtpu's spelling, e.g. ``v5e:2x4``."""
        return f"{self.chip.name}:{'x'.join(str(s) for s in self.shape)}"

    @property
    def num_devices(self) -> int:
        return math.prod(self.shape)

    @property
    def num_hosts(self) -> int:
        return self.num_devices // math.prod(self.host_shape)

    def sample_mesh(self, kv_heads: int = 8) -> tuple[int, int, int]:
        """(data, fsdp, tensor) for the decode loop: tensor-parallel up to the KV heads."""
        tensor = math.gcd(self.num_devices, kv_heads)
        return (self.num_devices // tensor, 1, tensor)

    def learn_mesh(self) -> tuple[int, int, int]:
        """(data, fsdp, tensor) for the train step: fully sharded data parallel."""
        return (1, self.num_devices, 1)

    def devices(self):
        """The slice's TPU devices as libtpu describes them (no TPU needed, libtpu is)."""
        try:
            from jax.experimental import topologies
        except ImportError as e:  # pragma: no cover - part of jax
            raise TopologyError(str(e)) from e
        # libtpu takes /tmp/libtpu_lockfile to guard a real TPU; describing a topology uses none,
        # so another JAX process (or test worker) that loaded libtpu must not block us.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        host = tuple(self.host_shape) + (1,) * (3 - len(self.host_shape))
        try:
            desc = topologies.get_topology_desc(
                platform="tpu",
                topology_name=self.topology_name,
                chip_config_name=self.chip.chip_config,
                chips_per_host_bounds=host,
                num_slices=1,
            )
        except Exception as e:  # libtpu missing or unusable
            raise TopologyError(
                f"cannot describe TPU topology {self.topology_name}: {e}. Compiling for a TPU from this machine "
                "needs the libtpu wheel: pip install libtpu==0.0.51 (pinned in requirements-test.txt); "
                "the analytic plan works without it."
            ) from e
        devices = list(desc.devices)
        if len(devices) != self.num_devices:
            raise TopologyError(
                f"{self.topology_name}: libtpu describes {len(devices)} devices, expected {self.num_devices}."
            )
        return devices


def _t(name, chip, shape, host):
    return Topology(name, CHIPS[chip], tuple(shape), tuple(host))


TOPOLOGIES = {
    t.name: t
    for t in (
        _t("v4-8", "v4", (2, 2, 1), (2, 2, 1)),
        _t("v4-16", "v4", (2, 2, 2), (2, 2, 1)),
        _t("v4-32", "v4", (2, 2, 4), (2, 2, 1)),
        _t("v5e-4", "v5e", (2, 2), (2, 2)),
        _t("v5e-8", "v5e", (2, 4), (2, 4)),
        _t("v5e-16", "v5e", (4, 4), (2, 2)),
        _t("v5e-32", "v5e", (4, 8), (2, 2)),
        _t("v5p-8", "v5p", (2, 2, 1), (2, 2, 1)),
        _t("v5p-16", "v5p", (2, 2, 2), (2, 2, 1)),
        _t("v6e-4", "v6e", (2, 2), (2, 2)),
        _t("v6e-8", "v6e", (2, 4), (2, 4)),
        _t("v6e-16", "v6e", (4, 4), (2, 2)),
    )
}
_BY_TOPOLOGY_NAME = {t.topology_name: t for t in TOPOLOGIES.values()}


def get(name: str) -> Topology:
    """A topology by Cloud slice name (``v5e-8``) or libtpu name (``v5e:2x4``)."""
    key = name.strip().lower()
    if key in TOPOLOGIES:
        return TOPOLOGIES[key]
    if key in _BY_TOPOLOGY_NAME:
        return _BY_TOPOLOGY_NAME[key]
    raise TopologyError(
        f"unknown TPU topology {name!r}; known: {', '.join(TOPOLOGIES)} "
        f"(or their libtpu names {', '.join(_BY_TOPOLOGY_NAME)}). Add a row to "
        "qsharp_jax/distributed/topologies.py::TOPOLOGIES for another slice."
    )


def detect(devices) -> Topology | None:
    """The preset matching running TPU devices (None off TPU or for an unlisted slice)."""
    if not devices or devices[0].platform != "tpu":
        return None
    kind = devices[0].device_kind.lower()
    chip = {"tpu v4": "v4", "tpu v5 lite": "v5e", "tpu v5e": "v5e", "tpu v5": "v5p", "tpu v5p": "v5p"}.get(kind)
    chip = chip or ("v6e" if "v6" in kind else None)
    for t in TOPOLOGIES.values():
        if t.chip.name == chip and t.num_devices == len(devices):
            return t
    return None
