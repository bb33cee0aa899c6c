"""When a training run stops, and how long it has left: SIGTERM and Ctrl-C, the wall-clock budget, the ETA.

Every process of a multi-host job must stop at the same step, so the flags are agreed across processes.
"""

import logging
import signal
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils


def _agreed(flag: bool, step: int, every: int) -> bool:
  """`flag` on one process; with several, true on all when any has it. Every process must stop at the same
  step, and agreeing costs a host sync, so several processes compare only every `every` steps."""
  if jax.process_count() > 1:
    if step % every:
      return False
    return bool(multihost_utils.process_allgather(np.array(flag)).any())
  return flag


class PreemptionFlag:
  """SIGTERM and the first SIGINT (Ctrl-C) set `requested`; the loop saves and stops at the next step boundary.

  Handling SIGINT here, rather than letting Python raise KeyboardInterrupt wherever the main thread happens to
  be, keeps the interrupt from landing in (and being swallowed by) a JAX callback. A second Ctrl-C stops at once.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

  def _handle(self, signum, frame):
    if signum == signal.SIGINT and self.requested:
      raise KeyboardInterrupt
    logging.warning('%s received: saving a checkpoint and exiting%s.', signal.Signals(signum).name,
                    ' (Ctrl-C again to stop at once)' if signum == signal.SIGINT else '')
    self.requested = True

  def check(self, step: int, every: int) -> bool:
    return _agreed(self.requested, step, every)

  def restore(self):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)


class TimeBudget:
  """config.train.time_budget_minutes: true once the wall time since `start` exceeds it (never when 0)."""

  def __init__(self, minutes: float, start: float):
    if minutes < 0:
      raise ValueError(f'config.train.time_budget_minutes must be >= 0 (0: no budget), got {minutes}.')
    self.seconds = 60.0 * minutes
    self.start = start

  def check(self, step: int, every: int) -> bool:
    # Clocks differ across hosts: _agreed makes them stop at the same step.
    return bool(self.seconds) and _agreed(time.time() - self.start >= self.seconds, step, every)


def format_duration(seconds: float) -> str:
  """45s, 1m22s, 2h05m."""
  s = int(round(max(seconds, 0.0)))
  if s < 60:
    return f'{s}s'
  if s < 3600:
    return f'{s // 60}m{s % 60:02d}s'
  return f'{s // 3600}h{s % 3600 // 60:02d}m'


class ETA:
  """Seconds left: the remaining steps at the mean step time since the loop started (compile excluded), or the
  time budget's remainder when that ends first."""

  def __init__(self, start_step: int, num_steps: int, budget: TimeBudget):
    self.start_step, self.num_steps, self.budget = start_step, num_steps, budget
    self.t0 = time.time()

  def __call__(self, step: int) -> float:
    now = time.time()
    left = (self.num_steps - step) * (now - self.t0) / max(step - self.start_step, 1)
    if self.budget.seconds:
      left = min(left, self.budget.seconds - (now - self.budget.start))
    return max(left, 0.0)
