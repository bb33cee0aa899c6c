"""The parameter update (optimizer, EMA, non-finite guard), per array and on one flat vector, against AdamW,
the global-norm clip and the EMA written out in numpy; the flat layout's optimizer state; and a checkpoint
resumed with the other layout, which is refused with a message naming the field."""

import jax
import numpy as np
import pytest

from configs import base
from idenc_jax.perf import fixtures
from idenc_jax.train import loop
from idenc_jax.train import state as state_lib
from idenc_jax.train import update as update_lib

import train_testing as tt


def _config(flat: bool):
  c = base.get_config('tiny')
  c.train.flat_update = flat
  c.train.warmup_steps = 1      # the rate is 0 at the first update and train.learning_rate from the second
  c.train.weight_decay = 1e-2   # the decoupled decay term takes part too
  c.train.grad_clip = 0.05      # below the random gradients' norm: the clip takes part
  return c


def _numpy_reference(config, params, grads_seq, losses):
  """AdamW after a global-norm clip (optax's clip_by_global_norm and adamw) and the warm-up EMA, in float64."""
  t = config.train
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  e = {k: v.copy() for k, v in p.items()}
  mu = {k: np.zeros_like(v) for k, v in p.items()}
  nu = {k: np.zeros_like(v) for k, v in p.items()}
  count = 0   # accepted updates: the step counter, Adam's count and the schedules' count alike
  for grads, loss in zip(grads_seq, losses):
    g = {k: np.asarray(v, np.float64) for k, v in grads.items()}
    norm = np.sqrt(sum((v ** 2).sum() for v in g.values()))
    if not (np.isfinite(loss) and np.isfinite(norm)):
      continue   # the guard: nothing changes, the step counter included
    g = {k: v * min(1.0, t.grad_clip / norm) for k, v in g.items()}
    lr = 0.0 if count == 0 else t.learning_rate
    decay = min(t.ema_decay, (1 + count) / (t.ema_warmup + count))
    count += 1
    for k in p:
      mu[k] = t.b1 * mu[k] + (1 - t.b1) * g[k]
      nu[k] = t.b2 * nu[k] + (1 - t.b2) * g[k] ** 2
      m_hat, v_hat = mu[k] / (1 - t.b1 ** count), nu[k] / (1 - t.b2 ** count)
      p[k] = p[k] - lr * (m_hat / (np.sqrt(v_hat) + 1e-8) + t.weight_decay * p[k])
      e[k] = e[k] + (1 - decay) * (p[k] - e[k])
  return p, e


def _flat_dict(tree):
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize('flat', [False, True])
def test_update_matches_numpy_adamw_clip_and_ema(flat):
  config = _config(flat)
  state, optimizer = fixtures.build_state(config)
  rng = np.random.default_rng(0)
  grads_seq = [jax.tree.map(lambda x: rng.normal(0, 0.1, x.shape).astype(np.float32), state.params)
               for _ in range(3)]
  losses = [1.0, np.nan, 0.5]   # the second update is refused by the guard
  expected_p, expected_e = _numpy_reference(config, _flat_dict(state.params),
                                            [_flat_dict(g) for g in grads_seq], losses)
  decay_of = state_lib.ema_decay_schedule(config)
  step = jax.jit(lambda s, g, loss: update_lib.apply(config, optimizer, s, g, loss, decay_of(s.step)))
  for grads, loss in zip(grads_seq, losses):
    before = state
    params, ema, opt_state, grad_norm, finite = step(state, grads, np.float32(loss))
    state = state.replace(step=state.step + finite.astype(np.int32), params=params, ema_params=ema,
                          opt_state=opt_state)
    if not np.isfinite(loss):
      assert not finite   # and the state is bit for bit the one before
      for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  got_p, got_e = _flat_dict(state.params), _flat_dict(state.ema_params)
  assert got_p.keys() == expected_p.keys()
  for k in expected_p:
    np.testing.assert_allclose(got_p[k], expected_p[k], rtol=1e-5, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(got_e[k], expected_e[k], rtol=1e-5, atol=1e-6, err_msg=k)
  initial = _flat_dict(fixtures.build_state(config)[0].params)
  moved = sum(np.abs(got_p[k] - v).sum() for k, v in initial.items())
  assert moved > 0   # the updates were not all zero


def test_flat_layout_keeps_the_moments_as_one_vector():
  config = _config(True)
  state, _ = fixtures.build_state(config)
  size = sum(x.size for x in jax.tree.leaves(state.params))
  vectors = [x for x in jax.tree.leaves(state.opt_state) if x.ndim == 1]
  assert sorted(x.size for x in vectors) == [size, size]   # Adam's mu and nu; the rest are counters
  assert all(x.ndim == 0 for x in jax.tree.leaves(state.opt_state) if x.ndim != 1)


def test_stage2_and_fsdp_refuse_the_flat_update():
  config = base.get_config('sr_cpu')
  assert not update_lib.is_flat(config)   # stage 2 configs turn it off
  config.train.flat_update = True
  with pytest.raises(ValueError, match='flat_update=True does not apply to stage 2'):
    update_lib.is_flat(config)
  config = _config(True)
  assert update_lib.is_flat(config)
  config.mesh.fsdp = -1
  with pytest.raises(ValueError, match=r'needs replicated parameters, but config.mesh.fsdp=-1'):
    update_lib.is_flat(config)


def test_a_checkpoint_resumes_only_with_its_own_layout(tmp_path):
  workdir = str(tmp_path)
  loop.train_and_evaluate(tt.tiny_config(**{'train.num_steps': 1, 'train.checkpoint_every': 1,
                                            'train.flat_update': True}), workdir)
  other = tt.tiny_config(**{'train.num_steps': 2, 'train.flat_update': False})
  with pytest.raises(ValueError, match=r'optimizer state is laid out otherwise .*config.train.flat_update.*'
                                       r'train.flat_update: True -> False'):
    loop.train_and_evaluate(other, workdir)
  # The same layout resumes and trains on.
  loop.train_and_evaluate(tt.tiny_config(**{'train.num_steps': 2, 'train.flat_update': True}), workdir)
