"""The training thread of a worker that trains without a training process (``--no-train-process``,
and every embedded worker).

A training process that goes ``train_timeout`` seconds without answering is killed
(:mod:`oclust.training_worker.trainproc`). A thread cannot be killed, so
:class:`TrainingThread` does the rest of that promise: once one call has run ``timeout``
seconds, every future waiting on the thread fails with :class:`TrainingHung` (the worker exits
1, as when a training process dies, and resumes from the last snapshot), and so does every later
call. Its threads are daemons, so the hung call cannot keep the process from exiting either.

Example:
    >>> import threading
    >>> t = TrainingThread(timeout=0.2)
    >>> t.submit(sum, [1, 2]).result()
    3
    >>> release = threading.Event()
    >>> t.submit(release.wait).exception(timeout=30)
    TrainingHung('the training thread did not finish a call within 0.2 s (train_timeout)')
    >>> t.submit(sum, [1, 2]).exception()
    TrainingHung('the training thread did not finish a call within 0.2 s (train_timeout)')
    >>> release.set()
    >>> t.shutdown()
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

from oclust.training_worker.resume import WorkerHalt

__all__ = ["TrainingHung", "TrainingThread"]

log = logging.getLogger(__name__)

Job = tuple[Future, Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class TrainingHung(WorkerHalt):
    """A call on the training thread ran ``train_timeout`` seconds: the worker exits 1."""


class TrainingThread(Executor):
    """One daemon thread that runs the calls submitted to it in order; hung calls fail.

    Args:
        timeout: seconds one call may run before every waiting future fails (``None``: no limit).
        initializer: called with ``initargs`` in the thread before its first call.
        initargs: arguments of ``initializer``.
    """

    def __init__(self, timeout: float | None = None,
                 initializer: Callable[..., object] | None = None,
                 initargs: tuple[Any, ...] = ()) -> None:
        self.timeout = timeout
        self.initializer, self.initargs = initializer, initargs
        self.failure: TrainingHung | None = None
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._waiting: set[Future] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()  # no more calls accepted
        self._over = threading.Event()  # the thread has ended, or hung
        self._running_since: float | None = None
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Queue ``fn(*args, **kwargs)``; the thread (and its watchdog) start with the first."""
        fut: Future = Future()
        with self._lock:
            if self.failure is not None:
                fut.set_exception(self.failure)
                return fut
            if self._closed.is_set():
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._waiting.add(fut)
            self._jobs.put((fut, fn, args, kwargs))
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="oclust-train",
                                                daemon=True)
                self._thread.start()
                if self.timeout is not None:
                    threading.Thread(target=self._watch, name="oclust-train-watchdog",
                                     daemon=True).start()
        return fut

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop after the queued calls; ``wait`` waits until they ran, or one of them hung."""
        with self._lock:
            if cancel_futures:
                for fut in self._waiting:
                    fut.cancel()
            self._closed.set()
            self._jobs.put(None)
        if wait and self._thread is not None:
            self._over.wait()

    def _work(self) -> None:
        ended = RuntimeError("the training thread ended")
        try:
            self._run_jobs()
        except BaseException as exc:  # the initializer raised: its calls get the error
            ended = RuntimeError(f"the training thread ended: {exc!r}")
            ended.__cause__ = exc
        finally:  # nothing may wait for a thread that is gone
            with self._lock:
                for fut in self._waiting:
                    if not fut.done():
                        fut.set_exception(ended)
                self._over.set()

    def _run_jobs(self) -> None:
        if self.initializer is not None:
            self.initializer(*self.initargs)
        while (job := self._jobs.get()) is not None:
            fut, fn, args, kwargs = job
            with self._lock:  # after a hang every waiting future has failed: none runs
                if self.failure is not None or not fut.set_running_or_notify_cancel():
                    continue
            self._running_since = time.monotonic()
            try:
                result: Any = fn(*args, **kwargs)
            except BaseException as exc:  # handed to the waiter, as ThreadPoolExecutor does
                self._settle(fut, exc, error=True)
            else:
                self._settle(fut, result, error=False)
            self._running_since = None

    def _settle(self, fut: Future, value: Any, error: bool) -> None:
        with self._lock:
            self._waiting.discard(fut)
            if fut.done():  # failed by the watchdog meanwhile
                return
            if error:
                fut.set_exception(value)
            else:
                fut.set_result(value)

    def _watch(self) -> None:
        """Sleep until the running call's deadline; past it, fail everything waiting."""
        assert self.timeout is not None
        while not self._over.is_set():
            since = self._running_since
            left = self.timeout if since is None else since + self.timeout - time.monotonic()
            if left <= 0:
                self._hung()
                return
            self._over.wait(left)

    def _hung(self) -> None:
        with self._lock:
            self.failure = TrainingHung(f"the training thread did not finish a call within "
                                        f"{self.timeout:g} s (train_timeout)")
            log.error("%s: the worker stops; the thread cannot be killed and is left behind",
                      self.failure)
            for fut in self._waiting:
                if not fut.done():
                    fut.set_exception(self.failure)
            self._waiting.clear()
            self._over.set()
