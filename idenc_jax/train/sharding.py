"""Device mesh and shardings: data parallelism by default, FSDP as configuration.

The mesh has axes ('data', 'fsdp') whose sizes come from `config.mesh` (-1: all remaining devices).
The batch is split over both axes. Parameters, EMA and optimizer state are replicated over 'data'
and, when the 'fsdp' axis is larger than 1, each array is split along its largest dimension that
'fsdp' divides (arrays too small to be worth splitting stay replicated).
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp')
BATCH_AXES = ('data', 'fsdp')
FSDP_MIN_SIZE = 2 ** 12   # arrays with fewer elements are replicated


def mesh_shape(config, num_devices: int) -> tuple[int, int]:
  sizes = [config.mesh.data, config.mesh.fsdp]
  if sizes.count(-1) > 1:
    raise ValueError(f'At most one mesh axis may be -1, got mesh.data={sizes[0]}, mesh.fsdp={sizes[1]}.')
  known = int(np.prod([s for s in sizes if s != -1]))
  if any(s == 0 or s < -1 for s in sizes) or num_devices % known:
    raise ValueError(f'mesh.data={sizes[0]} x mesh.fsdp={sizes[1]} does not divide {num_devices} devices.')
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f'mesh {sizes} uses {int(np.prod(sizes))} devices but {num_devices} are present.')
  return tuple(sizes)


def make_mesh(config, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(config, len(devices))
  # Auto axis types: shardings inside the step are left to XLA (Explicit types break conv FSDP steps).
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _fsdp_spec(shape, fsdp: int) -> P:
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      spec = [None] * len(shape)
      spec[dim] = 'fsdp'
      return P(*spec)
  return P()


def state_shardings(abstract_state, mesh: Mesh):
  """A NamedSharding for every leaf of an (abstract) train state."""
  fsdp = mesh.shape['fsdp']
  return jax.tree.map(lambda x: NamedSharding(mesh, _fsdp_spec(x.shape, fsdp)), abstract_state)


def check_batch_split(id_size: int, agnostic_size: int, mesh: Mesh) -> None:
  """Refuses, in one line, a batch part that the mesh's devices cannot share equally."""
  for part, size in (('identity', id_size), ('identity-agnostic', agnostic_size)):
    if size % mesh.size:
      raise ValueError(f'The {part} part of the batch ({size} images) does not split over the mesh\'s '
                       f'{mesh.size} devices; choose train.batch_size and data.agnostic_fraction so that it does.')


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Per-process numpy batch -> global jax arrays split over the batch axes (no copy across hosts)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
