"""The parameter update (optimizer, EMA, non-finite guard), per array and on one flat vector, against AdamW,
the global-norm clip and the EMA written out in numpy; the flat layout's optimizer state; and a checkpoint
resumed with the other layout, whose moments are converted exactly."""

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


def _moments(saved: dict) -> tuple[np.ndarray, np.ndarray]:
  """Adam's (mu, nu) in a checkpoint read back with `tt.read_state`, as flat vectors: a per-array checkpoint's
  arrays concatenated in the parameters' order, written out here with numpy."""
  adam = saved['opt_state'][1][0]   # chain(clip, adamw) -> adamw's chain -> scale_by_adam's state
  mu, nu = (adam['mu'], adam['nu']) if isinstance(adam, dict) else (adam.mu, adam.nu)   # read back, or optax's
  join = lambda m: m if isinstance(m, np.ndarray) else np.concatenate([a.ravel() for a in jax.tree.leaves(m)])
  return join(mu), join(nu)


def test_relayout_moves_the_moments_exactly():
  config = _config(False)
  state, optimizer = fixtures.build_state(config)
  rng = np.random.default_rng(0)
  grads = jax.tree.map(lambda x: rng.normal(0, 0.1, x.shape).astype(np.float32), state.params)
  opt_state = jax.jit(lambda s, g: update_lib.apply(config, optimizer, s, g, np.float32(1.0), 0.5)[2])(state, grads)
  flat_config = _config(True)
  flat = update_lib.relayout_opt_state(flat_config, optimizer, state.params, opt_state)
  mu, nu = _moments({'opt_state': jax.tree.map(np.asarray, opt_state)})
  flat_mu, flat_nu = _moments({'opt_state': jax.tree.map(np.asarray, flat)})
  np.testing.assert_array_equal(flat_mu, mu)
  np.testing.assert_array_equal(flat_nu, nu)
  assert np.abs(mu).sum() > 0
  back = update_lib.relayout_opt_state(config, optimizer, state.params, flat)
  assert jax.tree.structure(back) == jax.tree.structure(opt_state)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(opt_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_checkpoint_resumes_with_the_other_layout(tmp_path):
  # Per array for a step, then flat (a workdir written before the `cpu` configs took the flat update), against
  # a run per array throughout: the same function to float32 rounding (the layouts' sums differ in order), so
  # Adam's moments and the parameters agree to 1e-5 relative, which a lost or shuffled moment would not.
  mixed, straight = str(tmp_path / 'mixed'), str(tmp_path / 'straight')
  run = lambda workdir, steps, flat: loop.train_and_evaluate(tt.tiny_config(**{
      'train.num_steps': steps, 'train.checkpoint_every': 1, 'train.warmup_steps': 1,
      'train.flat_update': flat}), workdir)
  run(mixed, 1, False)
  run(mixed, 3, True)
  run(straight, 3, False)
  got, want = tt.read_state(mixed), tt.read_state(straight)
  assert isinstance(got['opt_state'][1][0]['mu'], np.ndarray)   # written with the layout it ran with
  for g, w in zip(_moments(got), _moments(want)):
    assert np.abs(w).max() > 0
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7 * np.abs(w).max())
  got_params = tt.flat(got['params'])
  for k, w in tt.flat(want['params']).items():
    np.testing.assert_allclose(got_params[k], w, rtol=1e-5, atol=1e-6, err_msg=k)
