"""The sharded train step on 8 simulated CPU devices equals the step on one device.

The same initial state and the same global batches go through the jitted step on a 1-device mesh,
a data-parallel mesh (data=8) and an FSDP mesh (data=2, fsdp=4); after a few steps parameters, EMA,
optimizer state and metrics agree within float tolerance (only the order of the reductions differs).
"""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from idenc_jax.data import pipeline
from idenc_jax.train import sharding as sharding_lib
from idenc_jax.train import state as state_lib
from idenc_jax.train import step as step_lib

import train_testing as tt

NUM_STEPS = 3
# Sums over 8 shards round differently from one sum; Adam divides by sqrt(v), so parameters whose
# gradient is tiny can move by a visibly different (still tiny) amount.
RTOL, ATOL = 1e-4, 2e-5


def mesh_config(data: int, fsdp: int):
  return tt.tiny_config(**{'mesh.data': data, 'mesh.fsdp': fsdp})


@pytest.fixture(scope='module')
def problem():
  """The tiny config, NUM_STEPS global batches from the pipeline, and a fresh state on the host."""
  config = tt.tiny_config()
  iterator = pipeline.make_train_iterator(config, process_index=0, process_count=1)
  batches = [next(iterator) for _ in range(NUM_STEPS)]
  mesh = sharding_lib.make_mesh(mesh_config(1, 1), jax.devices()[:1])
  rng = jax.random.key(config.seed)
  abstract = jax.eval_shape(lambda r: state_lib.create_train_state(config, r), rng)
  state = jax.jit(lambda r: state_lib.create_train_state(config, r),
                  out_shardings=sharding_lib.state_shardings(abstract, mesh))(rng)
  return config, batches, jax.device_get(state)


def train(config, mesh, host_state, batches):
  """NUM_STEPS jitted steps (NamedSharding in/out, donated state) on `mesh`."""
  shardings = sharding_lib.state_shardings(host_state, mesh)
  state = jax.device_put(host_state, shardings)
  optimizer = state_lib.make_optimizer(config, host_state.params)
  step = jax.jit(step_lib.make_train_step(config, optimizer),
                 in_shardings=(shardings, sharding_lib.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding_lib.replicated(mesh)), donate_argnums=(0,))
  metrics = []
  for batch in batches:
    state, m = step(state, sharding_lib.global_batch(batch, mesh))
    metrics.append(m)
  return state, jax.device_get(metrics)


@pytest.fixture(scope='module')
def single_device(problem):
  config, batches, host_state = problem
  mesh = sharding_lib.make_mesh(mesh_config(1, 1), jax.devices()[:1])
  state, metrics = train(config, mesh, host_state, batches)
  return jax.device_get(state), metrics


def check_same_training(state, metrics, reference):
  ref_state, ref_metrics = reference
  assert int(state.step) == int(ref_state.step) == NUM_STEPS
  for m, r in zip(metrics, ref_metrics):
    assert m['finite'] == r['finite'] == 1
    for key in ('loss', 'diff_id', 'diff_agnostic', 'grad_norm', 'learning_rate'):
      np.testing.assert_allclose(m[key], r[key], rtol=1e-5, err_msg=key)
  host = jax.device_get(state)
  tt.assert_trees_close(host.params, ref_state.params, rtol=RTOL, atol=ATOL, what='params')
  tt.assert_trees_close(host.ema_params, ref_state.ema_params, rtol=RTOL, atol=ATOL, what='ema')
  tt.assert_trees_close(host.opt_state, ref_state.opt_state, rtol=1e-3, atol=1e-9, what='opt_state')
  tt.assert_trees_equal(host.rng, ref_state.rng, 'rng')


def test_single_device_training_moves_parameters(problem, single_device):
  _, _, initial = problem
  state, metrics = single_device
  changes = [np.max(np.abs(a - b)) for a, b in zip(jax.tree.leaves(state.params),
                                                   jax.tree.leaves(initial.params))]
  assert max(changes) > 1e-3  # lr 1e-3 after warm-up: Adam moves parameters by about that much
  assert all(m['finite'] == 1 for m in metrics)


def test_data_parallel_matches_single_device(problem, single_device):
  config, batches, host_state = problem
  mesh = sharding_lib.make_mesh(mesh_config(-1, 1), jax.devices())
  assert dict(mesh.shape) == {'data': 8, 'fsdp': 1}
  state, metrics = train(config, mesh, host_state, batches)
  # Data parallel: every parameter replicated on all 8 devices.
  for leaf in jax.tree.leaves(state.params):
    assert leaf.sharding.is_fully_replicated
  check_same_training(state, metrics, single_device)


def test_fsdp_matches_single_device_and_shards_state(problem, single_device):
  config, batches, host_state = problem
  mesh = sharding_lib.make_mesh(mesh_config(2, 4), jax.devices())
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4}
  state, metrics = train(config, mesh, host_state, batches)
  # FSDP really partitions: every large parameter, its EMA and its Adam moments are split in 4 along
  # one dimension, and each device holds a quarter.
  sharded = 0
  for tree in (state.params, state.ema_params, state.opt_state):
    for leaf in jax.tree.leaves(tree):
      spec = leaf.sharding.spec
      if leaf.size >= sharding_lib.FSDP_MIN_SIZE and 'fsdp' in tuple(spec):
        dim = tuple(spec).index('fsdp')
        shard = leaf.addressable_shards[0].data
        assert shard.shape[dim] * 4 == leaf.shape[dim]
        sharded += 1
  n_large = sum(leaf.size >= sharding_lib.FSDP_MIN_SIZE for leaf in jax.tree.leaves(state.params))
  assert n_large > 10 and sharded >= 3 * n_large
  check_same_training(state, metrics, single_device)


def test_global_batch_places_rows_in_order(problem):
  config, batches, _ = problem
  mesh = sharding_lib.make_mesh(mesh_config(2, 4), jax.devices())
  batch = sharding_lib.global_batch(batches[0], mesh)
  for key, value in batches[0].items():
    assert batch[key].shape == value.shape
    np.testing.assert_array_equal(np.asarray(batch[key]), value)
    # Rows are split in 8 contiguous blocks over the (data, fsdp) devices.
    rows = len(value) // 8
    for shard in batch[key].addressable_shards:
      index = shard.index[0]
      assert index.stop - index.start == rows
      np.testing.assert_array_equal(shard.data, value[index])


def test_fsdp_spec_splits_the_largest_divisible_dimension():
  assert sharding_lib._fsdp_spec((3, 3, 32, 64), 4) == P(None, None, None, 'fsdp')
  assert sharding_lib._fsdp_spec((3, 3, 64, 30), 4) == P(None, None, 'fsdp', None)
  assert sharding_lib._fsdp_spec((3, 3, 30, 30), 4) == P()      # nothing divisible
  assert sharding_lib._fsdp_spec((64,), 4) == P()               # too small to split
  assert sharding_lib._fsdp_spec((3, 3, 32, 64), 1) == P()      # no fsdp axis


@pytest.mark.parametrize('data,fsdp,devices,expected', [
    (-1, 1, 8, (8, 1)), (2, -1, 8, (2, 4)), (-1, 4, 8, (2, 4)), (1, 1, 1, (1, 1)), (-1, 1, 1, (1, 1))])
def test_mesh_shape_resolves_minus_one(data, fsdp, devices, expected):
  assert sharding_lib.mesh_shape(mesh_config(data, fsdp), devices) == expected


@pytest.mark.parametrize('data,fsdp,devices,message', [
    (-1, -1, 8, 'At most one'), (3, -1, 8, 'does not divide'), (2, 2, 8, 'uses 4 devices'),
    (0, 1, 8, 'does not divide')])
def test_mesh_shape_rejects_bad_shapes(data, fsdp, devices, message):
  with pytest.raises(ValueError, match=message):
    sharding_lib.mesh_shape(mesh_config(data, fsdp), devices)


def test_batch_parts_must_split_over_the_mesh():
  mesh = sharding_lib.make_mesh(mesh_config(-1, 1), jax.devices()[:4])
  sharding_lib.check_batch_split(12, 4, mesh)                            # 3 and 1 per device
  with pytest.raises(ValueError, match=r'identity-agnostic part of the batch \(2 images\) does not split'):
    sharding_lib.check_batch_split(12, 2, mesh)
  with pytest.raises(ValueError, match=r'The identity part of the batch \(6 images\)'):
    sharding_lib.check_batch_split(6, 4, mesh)


def test_fused_group_norm_trains_the_same_under_fsdp(problem):
  """The fused group norm's own VJP under data x FSDP sharding: the same training as on one device
  (its per-sample statistics stay on the device of their sample; its scale/bias gradients sum over
  the batch across devices)."""
  _, batches, host_state = problem
  config = tt.tiny_config(**{'model.group_norm': 'fused'})
  single = train(config, sharding_lib.make_mesh(mesh_config(1, 1), jax.devices()[:1]), host_state, batches)
  sharded = tt.tiny_config(**{'model.group_norm': 'fused', 'mesh.data': 2, 'mesh.fsdp': 4})
  state, metrics = train(sharded, sharding_lib.make_mesh(mesh_config(2, 4), jax.devices()), host_state,
                         batches)
  check_same_training(state, metrics, (jax.device_get(single[0]), single[1]))
