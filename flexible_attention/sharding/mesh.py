"""Device meshes and the mapping of attention axes onto mesh axes."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType
from jax.sharding import Mesh

AxisNames = str | tuple[str, ...] | None


def make_mesh(axis_dims: Sequence[int] = (1, -1, 1, 1),
              axis_names: Sequence[str] = ("dp", "fsdp", "tp", "sp"),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a device mesh with `Auto` axis types.

  Args:
    axis_dims: the size of each axis; one entry may be `-1`, taking the
      devices left over by the others. Without `-1` the mesh may use fewer
      devices than given: the first `prod(axis_dims)` of them.
    axis_names: the name of each axis.
    devices: the devices to use (default: `jax.devices()`).

  Returns:
    A `jax.sharding.Mesh` whose axes are all `AxisType.Auto`, so that code
    under `jax.jit` (Haiku parameters included) is sharded by the compiler
    wherever the attention layer does not shard explicitly.
  """
  axis_dims, axis_names = tuple(axis_dims), tuple(axis_names)
  if len(axis_dims) != len(axis_names):
    raise ValueError(f"make_mesh: axis_dims {axis_dims} and axis_names "
                     f"{axis_names} must have the same length.")
  if len(set(axis_names)) != len(axis_names):
    raise ValueError(f"make_mesh: axis_names must be distinct, got "
                     f"{axis_names}.")
  devices = list(jax.devices() if devices is None else devices)
  if axis_dims.count(-1) > 1:
    raise ValueError(f"make_mesh: at most one axis may be -1, got "
                     f"{axis_dims}.")
  if any(d == 0 or d < -1 for d in axis_dims):
    raise ValueError(f"make_mesh: axis sizes must be positive or -1, got "
                     f"{axis_dims}.")
  known = math.prod(d for d in axis_dims if d != -1)
  if -1 in axis_dims:
    if len(devices) % known:
      raise ValueError(f"make_mesh: {len(devices)} devices cannot be split "
                       f"into axes {axis_dims}.")
    axis_dims = tuple(len(devices) // known if d == -1 else d
                      for d in axis_dims)
  if math.prod(axis_dims) > len(devices):
    raise ValueError(f"make_mesh: axes {dict(zip(axis_names, axis_dims))} "
                     f"need {math.prod(axis_dims)} devices, there are "
                     f"{len(devices)}.")
  devices = devices[:math.prod(axis_dims)]
  return jax.make_mesh(axis_dims, axis_names,
                       axis_types=(AxisType.Auto,) * len(axis_names),
                       devices=devices)


@dataclasses.dataclass(frozen=True)
class PartitionAxis:
  """Which mesh axes shard which attention axes.

  Each field names one mesh axis, a tuple of mesh axes, or `None` (not
  sharded). Axes of size 1 in the mesh shard nothing.

  Attributes:
    batch_axis: the batch axis B.
    query_sequence_axis: the query sequence axis Sq.
    key_sequence_axis: the key/value sequence axis Sk.
    head_axis: the head axes H and Hkv.
    attention_dim_axis: the head-size axis D (attention cannot shard it; any
      axis of size > 1 here is an error).
  """

  batch_axis: AxisNames = ("dp", "fsdp")
  query_sequence_axis: AxisNames = "sp"
  key_sequence_axis: AxisNames = "sp"
  head_axis: AxisNames = "tp"
  attention_dim_axis: AxisNames = None

  def fields(self) -> dict[str, AxisNames]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def axis_names_of(axes: AxisNames) -> tuple[str, ...]:
  """The mesh axis names of a `PartitionAxis` field, as a tuple."""
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def spec_entry(axes: AxisNames) -> str | tuple[str, ...] | None:
  """The `PartitionSpec` entry (and collective axis name) of `axes`: None,
  one name, or a tuple of names."""
  names = axis_names_of(axes)
  if not names:
    return None
  return names[0] if len(names) == 1 else names


def shared_sequence_axis(mechanism: str, axes: PartitionAxis
                        ) -> str | tuple[str, ...] | None:
  """The `spec_entry` of the one mesh axis that shards both the query and
  the key sequences, for a sequence-parallel `mechanism`.

  Raises:
    NotImplementedError: when the query and key sequences are sharded over
      different mesh axes.
  """
  if axis_names_of(axes.query_sequence_axis) != axis_names_of(
      axes.key_sequence_axis):
    raise NotImplementedError(
        f"{mechanism}: the query and key sequences must be sharded over the "
        f"same mesh axis, got query_sequence_axis="
        f"{axes.query_sequence_axis!r}, key_sequence_axis="
        f"{axes.key_sequence_axis!r}.")
  return spec_entry(axes.key_sequence_axis)


def axis_size(mesh: Mesh, axes: AxisNames) -> int:
  """The number of shards that `axes` make on `mesh` (1 for `None`)."""
  return int(np.prod([mesh.shape[a] for a in axis_names_of(axes)], dtype=int))


def validate_partition(mesh: Mesh, partition_axis: PartitionAxis):
  """Checks that every mesh axis named by `partition_axis` exists."""
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh)}.")
  if not isinstance(partition_axis, PartitionAxis):
    raise TypeError("partition_axis must be a fa.PartitionAxis, got "
                    f"{type(partition_axis)}.")
  for field, axes in partition_axis.fields().items():
    for axis in axis_names_of(axes):
      if axis not in mesh.axis_names:
        raise ValueError(
            f"partition_axis.{field} names mesh axis {axis!r}, which the mesh "
            f"does not have; mesh axes: {mesh.axis_names}.")
