"""A background thread that prepares the next items (e.g. device batches) while the step runs.

Standard library only: the trainer and the benchmark (which runs where clu and grain are absent) share it.
"""

import queue
import threading
from typing import Any, Callable


class Prefetcher:
  """`next()` returns the results of `take()` in order, `depth` of them prepared ahead on a thread
  (depth 0: `take()` synchronously). An exception in `take()` is raised by the `next()` that reaches it."""

  def __init__(self, take: Callable[[], Any], depth: int):
    self._take = take
    self.queue = queue.Queue(maxsize=max(depth, 1))
    self.stop = threading.Event()
    self.thread = None
    if depth > 0:
      self.thread = threading.Thread(target=self._fill, daemon=True)
      self.thread.start()

  def _fill(self):
    try:
      while not self.stop.is_set():
        item = self._take()
        while not self.stop.is_set():
          try:
            self.queue.put(item, timeout=0.1)
            break
          except queue.Full:
            pass
    except BaseException as e:  # surfaced in the main thread
      self.queue.put(e)

  def next(self):
    if self.stop.is_set():   # the filling thread is gone: waiting on the queue would never return
      raise RuntimeError('next() on a closed Prefetcher')
    if self.thread is None:
      return self._take()
    item = self.queue.get()
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self):
    self.stop.set()
    if self.thread is not None:
      self.thread.join(timeout=5)
