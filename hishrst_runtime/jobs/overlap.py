"""Keeping the engine busy across slides: finishing a slide on a thread while the next one streams, and starting
the next slide's read-ahead once the current one has every read under way.

:class:`Finisher` runs what is left of a streamed slide (its store's finalize, QC thumbnail, other ``--format``
outputs, closing the slide, releasing its lock) on one thread, in slide order, while the runner streams the next
slide; :meth:`Finisher.collect` joins it (before ``run_slides`` returns, so before any run report). Its
tasks are expected to return a result and not raise (the runner's turn a slide's failure into its result).
:func:`read_ahead_when_prepared` starts the :class:`~hishrst_runtime.inference.pipeline.ReadAhead` of a slide
prepared in the background (at once if it is ready, else when its preparation ends).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["FINISH_QUEUE", "Finisher", "read_ahead_when_prepared"]

#: Slides that may wait to be finished behind the one finishing (each keeps its slide open and its lock held).
FINISH_QUEUE = 2


class Finisher:
    """Slide finishing on one thread, in the order submitted. At most :data:`FINISH_QUEUE` slides wait behind the
    one finishing (:meth:`submit` returns at once while fewer do): the engine goes on to the next slide while a
    short slide's finish queues behind a long one's."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hishrst-finish")
        self._futures: dict[int, Future] = {}
        self._lock = threading.Lock()

    def submit(self, i: int, task: Callable[[], Any]) -> None:
        """Queue slide ``i``'s ``task``, then wait until at most :data:`FINISH_QUEUE` slides wait to be finished."""
        with self._lock:
            self._futures[i] = self._pool.submit(task)
            pending = [f for f in self._futures.values() if not f.done()]
        for f in pending[: max(0, len(pending) - 1 - FINISH_QUEUE)]:
            f.exception()  # wait; an unexpected error is raised by collect()

    @property
    def busy(self) -> bool:
        """Whether a slide is still being finished."""
        with self._lock:
            return any(not f.done() for f in self._futures.values())

    def collect(self, results: dict[int, Any]) -> None:
        """Wait for every queued slide and put its result into ``results`` (by slide index)."""
        with self._lock:
            items = list(self._futures.items())
        for i, f in items:
            results[i] = f.result()
            with self._lock:
                self._futures.pop(i, None)

    def shutdown(self) -> None:
        """Finish what is queued (each slide's lock is released by its task) and stop the thread."""
        self._pool.shutdown(wait=True)


def _start_ahead(fut: Future) -> None:
    if fut.cancelled() or fut.exception() is not None:
        return  # the slide's own turn reports its failure
    ahead = getattr(fut.result(), "ahead", None)
    if ahead is not None:
        ahead.start()


def read_ahead_when_prepared(futures: Iterable[Future]) -> None:
    """Start the read-ahead of each slide being prepared in ``futures`` once it is prepared."""
    for fut in list(futures):
        fut.add_done_callback(_start_ahead)
