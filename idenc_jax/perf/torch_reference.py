"""The PyTorch reference of a stage-1 train step, timed beside the jax variants (`benchmark --reference=torch`).

`loss_from_draws` is `train.losses.compute_loss` for stage 1 written in PyTorch (the paper's eps target, with
the config's min-SNR weighting, curriculum, convex group embeddings, identity loss and null-identity share),
given the step's random draws, so that the tests can feed it jax's draws and compare the two losses. The
timed step (`TorchBench.step`) draws its own numbers with torch's generator, then runs forward, backward,
global-norm clipping, AdamW and the EMA update, as `train.step` does: the same work per image.

torch is imported lazily; the PyTorch models are `perf.torch_model`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import numpy as np

from idenc_jax.diffusion import schedules
from idenc_jax.perf import fixtures, flops, measure, torch_model


def _torch():
  import torch   # lazy: an optional dependency, for the reference only
  return torch


def torch_with_threads(threads: int | None = None):
  """torch with its intra-op threads set to `threads` (default: every core, as XLA:CPU uses them), so every
  PyTorch timing beside ours runs on the same cores."""
  torch = _torch()
  torch.set_num_threads(threads or os.cpu_count() or 1)
  return torch


@dataclasses.dataclass
class Draws:
  """One step's random numbers, as `compute_loss` draws them: t [n], noise [n, 3, R, R] (NCHW),
  keep_group [G] bool (a group keeps its identity), exponential [n_id] (Dirichlet(1) weights before
  normalising within each group), null [n] bool or None (images denoised without identity)."""
  t: Any
  noise: Any
  keep_group: Any
  exponential: Any
  null: Any


def check_supported(config) -> None:
  if config.stage != 1 or config.diffusion.prediction != 'eps':
    raise ValueError('The PyTorch reference mirrors the stage-1 eps objective only; got stage '
                     f'{config.stage}, prediction {config.diffusion.prediction!r}.')


def curriculum_probability(config, step: int) -> float:
  lc = config.loss
  frac = min(max(step / max(lc.curriculum_steps, 1), 0.0), 1.0)
  return lc.curriculum_start + (lc.curriculum_end - lc.curriculum_start) * frac


def soft_nearest_neighbor_loss(z, labels, temperature: float, valid):
  """`losses.soft_nearest_neighbor_loss` in PyTorch."""
  torch = _torch()
  n = z.shape[0]
  sq = (z * z).sum(-1)
  d2 = (sq[:, None] + sq[None, :] - 2.0 * z @ z.T).clamp_min(0.0)
  logits = -d2 / temperature
  eye = torch.eye(n, dtype=torch.bool)
  others = ~eye & valid[None, :] & valid[:, None]
  same = others & (labels[:, None] == labels[None, :])
  neg = torch.finfo(torch.float32).min
  log_num = torch.logsumexp(torch.where(same, logits, torch.full_like(logits, neg)), -1)
  log_den = torch.logsumexp(torch.where(others, logits, torch.full_like(logits, neg)), -1)
  anchor = same.any(-1)
  per_anchor = torch.where(anchor, log_den - log_num, torch.zeros_like(log_den))
  return per_anchor.sum() / anchor.sum().clamp_min(1)


class ScheduleTables:
  """The schedule's float32 tables (`diffusion.schedules`) as torch tensors."""

  def __init__(self, config):
    torch = _torch()
    s = schedules.from_config(config)
    self.timesteps = s.timesteps
    self.sqrt_ab = torch.tensor(np.asarray(s.sqrt_alphas_cumprod, np.float32))
    self.sqrt_1m_ab = torch.tensor(np.asarray(s.sqrt_one_minus_alphas_cumprod, np.float32))


def loss_from_draws(config, models, tables: ScheduleTables, x_id, labels, groups, x_ag, draws: Draws,
                    step: int):
  """Stage-1 total loss (and its terms) of images in [-1, 1], NCHW float32, given the step's draws."""
  torch = _torch()
  lc = config.loss
  n_id = x_id.shape[0]
  x0 = torch.cat([x_id, x_ag])
  t = draws.t
  a, s = tables.sqrt_ab[t][:, None, None, None], tables.sqrt_1m_ab[t][:, None, None, None]
  x_t = a * x0 + s * draws.noise
  z_all = models.encoder(x0)
  z_id, z_ag = z_all[:n_id], z_all[n_id:]
  num_groups = n_id // config.data.images_per_identity
  keep = draws.keep_group[groups]
  if lc.average_embedding:
    e = draws.exponential
    totals = torch.zeros(num_groups).index_add(0, groups, e)
    w = e / totals[groups]
    pooled = torch.zeros(num_groups, z_id.shape[1]).index_add(0, groups, w[:, None] * z_id)
    cond_id = torch.where(keep[:, None], pooled[groups], z_id)
  else:
    cond_id = z_id
  cond = torch.cat([cond_id, z_ag])
  out = models.generator(x_t, t, cond, draws.null)
  per_example = ((out - draws.noise) ** 2).mean(dim=(1, 2, 3))
  if lc.weighting == 'min_snr':
    snr = (tables.sqrt_ab[t] / tables.sqrt_1m_ab[t]) ** 2
    per_example = per_example * snr.clamp_max(lc.min_snr_gamma) / snr
  elif lc.weighting != 'none':
    raise ValueError(f'The PyTorch reference has no loss weighting {lc.weighting!r}.')
  diff_id, diff_ag = per_example[:n_id].mean(), per_example[n_id:].mean()
  id_loss = (soft_nearest_neighbor_loss(z_id, labels, lc.id_temperature, keep) if lc.use_id_loss
             else torch.zeros(()))
  loss = diff_id + lc.id_weight * id_loss
  if lc.use_agnostic:
    loss = loss + lc.agnostic_weight * diff_ag
  return loss, {'diff_id': diff_id, 'diff_agnostic': diff_ag, 'id_loss': id_loss}


def torch_batch(batch: dict[str, np.ndarray]):
  """A host batch (`perf.fixtures.synthetic_batch`: uint8 NHWC) -> (x_id, labels, groups, x_ag), NCHW in [-1, 1]."""
  torch = _torch()
  to = lambda x: torch.from_numpy(np.ascontiguousarray(
      (np.asarray(x, np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2)))
  return (to(batch['id_images']), torch.from_numpy(np.asarray(batch['id_labels'], np.int64)),
          torch.from_numpy(np.asarray(batch['id_groups'], np.int64)), to(batch['agnostic_images']))


class TorchBench:
  """The PyTorch train step of `config` (same batch, optimizer and EMA), timed like `bench.TrainBench`."""

  def __init__(self, config, log: Callable[[str], None] = lambda s: None, params: dict | None = None,
               threads: int | None = None):
    check_supported(config)
    torch = torch_with_threads(threads)
    self.torch, self.config, self.log = torch, config, log
    torch.manual_seed(config.seed)
    self.models = torch_model.build(config)
    if params is not None:
      torch_model.load_flax_params(self.models, params)
    self.models.train()
    t = config.train
    self.opt = torch.optim.AdamW(self.models.parameters(), lr=t.learning_rate, betas=(t.b1, t.b2), eps=1e-8,
                                 weight_decay=t.weight_decay)
    self.ema = [p.detach().clone() for p in self.models.parameters()]
    self.tables = ScheduleTables(config)
    self.batches = [torch_batch(fixtures.synthetic_batch(config, seed)) for seed in range(3)]
    self.n = 0
    self.times: list[float] = []
    self.sample_times: list[float] = []
    self.loss = float('nan')
    b = config.train.batch_size
    self.record: dict[str, Any] = {
        'device': 'cpu (torch)', 'host': measure.host_info(), 'batch_size': b, 'dtype': 'float32',
        'framework': f'torch {torch.__version__}', 'torch_threads': torch.get_num_threads(),
        'params': torch_model.num_params(self.models)}

  def draws(self, n_id: int, n: int) -> Draws:
    torch, c = self.torch, self.config
    r = c.model.resolution
    groups = n_id // c.data.images_per_identity
    p_drop = curriculum_probability(c, self.n)
    prob = c.loss.null_identity_prob
    return Draws(t=torch.randint(0, self.tables.timesteps, (n,)), noise=torch.randn(n, 3, r, r),
                 keep_group=torch.rand(groups) >= p_drop, exponential=torch.empty(n_id).exponential_(),
                 null=(torch.rand(n) < prob) if prob > 0 else None)

  def step(self, timed: bool = True) -> float:
    torch, t = self.torch, self.config.train
    t0 = time.perf_counter()
    x_id, labels, groups, x_ag = self.batches[self.n % len(self.batches)]
    draws = self.draws(x_id.shape[0], x_id.shape[0] + x_ag.shape[0])
    loss, _ = loss_from_draws(self.config, self.models, self.tables, x_id, labels, groups, x_ag, draws, self.n)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    if t.grad_clip and t.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(self.models.parameters(), t.grad_clip)
    self.opt.step()
    decay = min(t.ema_decay, (1 + self.n) / (t.ema_warmup + self.n)) if t.ema_warmup else t.ema_decay
    with torch.no_grad():
      torch._foreach_lerp_(self.ema, [p.detach() for p in self.models.parameters()], 1.0 - decay)
    self.n += 1
    self.loss = float(loss.detach())
    seconds = time.perf_counter() - t0
    if timed:
      self.times.append(seconds)
    return seconds

  def flops_per_image(self) -> float:
    """PyTorch's own count (torch.utils.flop_counter: convolutions, matmuls, attention) of one train step's
    forward and backward, per image."""
    from torch.utils.flop_counter import FlopCounterMode   # lazy: as torch
    x_id, labels, groups, x_ag = self.batches[0]
    draws = self.draws(x_id.shape[0], x_id.shape[0] + x_ag.shape[0])
    with FlopCounterMode(display=False) as counter:
      loss, _ = loss_from_draws(self.config, self.models, self.tables, x_id, labels, groups, x_ag, draws, 0)
      loss.backward()
    self.models.zero_grad(set_to_none=True)
    return counter.get_total_flops() / self.config.train.batch_size

  def sample_step(self, batch: int, timed: bool = True) -> float:
    """One generator forward at `batch` images without gradients (a sampling step), synchronised."""
    torch, c = self.torch, self.config
    r = c.model.resolution
    x, z = torch.randn(batch, 3, r, r), torch.randn(batch, c.model.embed_dim)
    tt = torch.full((batch,), 500)
    t0 = time.perf_counter()
    with torch.no_grad():
      self.models.generator(x, tt, z)
    seconds = time.perf_counter() - t0
    if timed:
      self.sample_times.append(seconds)
    return seconds

  def finish(self, sample_batch: int = 0, sample_repeats: int = 5) -> dict[str, Any]:
    r, b = self.record, self.config.train.batch_size
    if not self.times:
      raise ValueError('no timed steps were run')
    step_s = float(np.median(self.times))
    r.update(train_step_ms=1e3 * step_s, train_step_ms_min=1e3 * float(np.min(self.times)),
             train_images_per_s=b / step_s, timed_steps=len(self.times), statistic='median', loss=self.loss,
             finite=bool(np.isfinite(self.loss)), flops_per_image_torch=self.flops_per_image(),
             flops_per_image_analytic=measure.analytic_flops_per_image(self.config),
             # The counter's convention (matrix products, padded taps) of our analytic count, for the ratio.
             flops_per_image_analytic_torch_convention=float(flops.training_flops_per_image(
                 self.config, elementwise=False, count_padding=True)))
    r['sample_batch'], r['sample_step_ms'] = sample_batch, None
    if sample_batch:
      if not self.sample_times:
        for i in range(2 + sample_repeats):
          self.sample_step(sample_batch, timed=i >= 2)
      r['sample_step_ms'] = 1e3 * float(np.median(self.sample_times))
    self.log(f'torch train step {r["train_step_ms"]:.1f} ms')
    return r
