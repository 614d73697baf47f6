"""The synchronous half of the worker: one model, trained batch by batch, watched, snapshotted.

Everything here runs in one worker thread at a time (the asyncio loop awaits each call), so
the model is never touched concurrently. :class:`~oclust.training_worker.trainproc.ProcessTrainer`
keeps the same bookkeeping (:meth:`Trainer.observe`) and moves the model to its own process.

Example:
    >>> import numpy as np
    >>> from oclust.training_worker.batching import Batch
    >>> from oclust.training_worker.monitor import CollapseGuard, WorkerMetrics
    >>> from oclust.model import OnlineClusterer
    >>> t = Trainer(OnlineClusterer(n_clusters=2, latent_dim=4, seed=0),
    ...             CollapseGuard(0.0, 5), WorkerMetrics())
    >>> X = np.random.default_rng(0).normal(size=(32, 3)).astype("float32")
    >>> t.step(Batch(X, np.full(32, -1))).n
    32
    >>> t.snapshot({"topic:0": 32}).meta.offsets
    {'topic:0': 32}
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from oclust.model import OnlineClusterer, Snapshot, SnapshotError, StepReport
from oclust.model import metrics as model_metrics
from oclust.model.snapshot import OffsetState
from oclust.training_worker.batching import Batch
from oclust.training_worker.monitor import (
    RECOVERY,
    RESERVOIR_REACH,
    RESERVOIR_ROWS,
    RESERVOIR_WINDOWS,
    CollapseGuard,
    InputReservoir,
    QualityWindow,
    WorkerMetrics,
)

__all__ = ["MODEL_FAULTS", "ModelBroken", "Trainer", "TrainerHooks"]

log = logging.getLogger(__name__)

QUALITY_EVERY_S = 1.0  # live ACC/NMI gauges refresh at most this often
SHARE_WINDOW = 2000  # recent served assignments behind the cluster shares of a snapshot
# restores of one healthy snapshot with no publish between: when its weights keep collapsing on
# the stream (the stream changed: a new sensor gain), restoring again would discard every
# adaptation, and snapshots would stay withheld for good
MAX_RESTORES = 3


class ModelBroken(RuntimeError):
    """The model refuses every batch (or its weights went NaN): the worker must stop."""


# The model, not a message, is at fault: the worker stops without counting a crash against the
# messages in hand (none of them goes to the DLQ as poison)
MODEL_FAULTS = (ModelBroken, FloatingPointError, SnapshotError)


@dataclass
class TrainerHooks:
    """Optional callbacks, called in the training thread (for embedding and tests).

    ``on_step(report, batch)`` after each step; ``on_collapse(model, restored)`` after the
    guard fired (``restored`` is the snapshot whose weights were put back, or ``None``). With a
    training process (:mod:`oclust.training_worker.trainproc`) both run in the event loop's thread,
    and ``on_collapse`` gets a CPU copy of the restored model.
    """

    on_step: Callable[[StepReport, Batch], None] | None = None
    on_collapse: Callable[[OnlineClusterer, Snapshot | None], None] | None = None


@dataclass(eq=False)
class Trainer:
    """Holds the model, its guard, live quality and the last healthy snapshot.

    ``steps_ahead``: batches the loop hands over before the first of them has trained (the
    training thread then never waits on a decode).

    Args:
        model: the clusterer (fresh or restored from a snapshot).
        guard: the collapse guard.
        metrics: Prometheus metrics to update.
        quality: window for live ACC/NMI (created if omitted).
        restore: put the last healthy snapshot back when the guard fires (at most
            :data:`MAX_RESTORES` times until the next publish).
        healthy: the last healthy snapshot (e.g. the one the worker resumed from).
        hooks: callbacks for tests and embedding.
    """

    steps_ahead: ClassVar[int] = 8

    model: OnlineClusterer
    guard: CollapseGuard
    metrics: WorkerMetrics
    quality: QualityWindow = field(default_factory=QualityWindow)
    restore: bool = True
    healthy: Snapshot | None = None
    hooks: TrainerHooks = field(default_factory=TrainerHooks)
    last: StepReport | None = field(default=None, init=False)
    steps_since_snapshot: int = field(default=0, init=False)
    failed_steps: int = field(default=0, init=False)
    refused_in_a_row: int = field(default=0, init=False)
    max_refused: int = 20  # refusals in a row that mean a broken model: the worker stops
    restores: int = field(default=0, init=False)  # restores since the last publish
    recent: deque[int] = field(default_factory=lambda: deque(maxlen=SHARE_WINDOW), init=False)
    reservoir: InputReservoir | None = field(default=None, init=False)  # sized at the first step
    judged_unhealthy: bool = field(default=False, init=False)  # judged collapsed, not cleared
    judge_owed: int = field(default=0, init=False)  # passing judgements owed since a failed one
    judged_last: tuple[str, int] | None = field(default=None, init=False)  # weights, inputs
    judge_off_logged: bool = field(default=False, init=False)
    _quality_at: float = field(default=-math.inf, init=False)

    def step(self, batch: Batch) -> StepReport | None:
        """One ``partial_fit`` on ``batch``; ``None`` if the model refused it (logged)."""
        t0 = time.perf_counter()
        try:
            report = self.model.partial_fit(batch.x).last_step_
        except ValueError as exc:
            return self.refused(len(batch), str(exc))
        return self.observe(report, batch, time.perf_counter() - t0)

    async def run_step(self, batch: Batch, executor: Executor | None) -> StepReport | None:
        """:meth:`step` on ``executor``, the one thread that owns the model."""
        return await asyncio.get_running_loop().run_in_executor(executor, self.step, batch)

    async def run_snapshot(self, offsets: dict[str, int], extra: dict[str, float] | None,
                           executor: Executor | None,
                           offset_state: OffsetState | None = None) -> Snapshot:
        """:meth:`snapshot` on ``executor``, the one thread that owns the model."""
        return await asyncio.get_running_loop().run_in_executor(
            executor, self.snapshot, offsets, extra, offset_state)

    def refused(self, n: int, why: str) -> None:
        """The model refused a batch of ``n`` samples: counted and logged, the batch skipped.

        ``max_refused`` refusals in a row mean the model, not the data, is at fault (weights
        blown up by a learning rate far too high): :class:`ModelBroken` then stops the worker
        before it commits the offsets of a stream it no longer trains on.
        """
        self.failed_steps += 1
        self.refused_in_a_row += 1
        self.metrics.refused.inc()
        log.error("training step on %d samples failed, batch skipped: %s", n, why)
        if self.refused_in_a_row >= self.max_refused:
            raise ModelBroken(
                f"the model refused {self.refused_in_a_row} batches in a row (last: {why}); "
                "it is broken, not the data: stopping without publishing or committing "
                "(the last published snapshot and its offsets stand)"
            )

    def observe(self, report: StepReport, batch: Batch, seconds: float) -> StepReport:
        """Metrics, guard, live quality and hooks of one step that took ``seconds``."""
        m = self.metrics
        self.refused_in_a_row = 0
        m.step_seconds.observe(seconds)
        m.samples.inc(report.n)
        m.batches.inc()
        m.loss.set(report.loss)
        m.train_hard_entropy.set(report.train_hard_entropy)
        m.train_kl_star.set(report.train_kl_star)
        self.last = report
        self.steps_since_snapshot += 1
        self.recent.extend(report.served_labels.tolist())
        self._keep_inputs(batch.x)
        fired = self.guard.observe_labels(report.served_labels, self.model.n_clusters)
        self.quality.add(batch.labels, report.served_labels)  # quality of what is served
        m.served_hard_entropy.set(self.guard.window_entropy())
        m.served_kl_star.set(self.served_kl_star())
        now = time.monotonic()
        if now - self._quality_at >= QUALITY_EVERY_S:  # Hungarian + NMI: not on every step
            self._quality_at = now
            scores = self.quality.scores()
            if scores:
                m.acc.set(scores["acc"])
                m.nmi.set(scores["nmi"])
        if self.hooks.on_step is not None:
            self.hooks.on_step(report, batch)
        if fired:
            self._collapsed(report)
        self._set_collapsed_gauge()
        return report

    def _set_collapsed_gauge(self) -> None:
        """``oclust_worker_collapsed``: 1 while the guard or the snapshot judge holds back."""
        self.metrics.collapsed.set(0 if self.guard.healthy and not self.judged_unhealthy else 1)

    def _judge_floor(self) -> int:
        """Inputs the judge needs: as many as the guard's smallest judged window."""
        return self.guard.smallest_window(self.model.n_clusters)

    def _keep_inputs(self, x: np.ndarray) -> None:
        """Offer the batch's inputs to the reservoir that :meth:`publishable` judges on."""
        self._reservoir().add(x)

    def _reservoir(self) -> InputReservoir:
        """The reservoir of older inputs, made at first use: sized for the model's K and the
        guard's window, and seeded with the sample stored in the snapshot resumed from."""
        if self.reservoir is None:
            window = self.guard.window_size(self.model.n_clusters)
            reach = min(RESERVOIR_WINDOWS * window, RESERVOIR_REACH)
            rows = max(RESERVOIR_ROWS, self._judge_floor())
            self.reservoir = InputReservoir(rows=rows, horizon=max(reach, rows))
            if self.healthy is not None:
                self._resume_sample(self.reservoir, self.healthy)
        return self.reservoir

    def _resume_sample(self, reservoir: InputReservoir, snapshot: Snapshot) -> None:
        """Seed ``reservoir`` with the older inputs stored in ``snapshot`` (:meth:`with_sample`),
        if it holds a sample of the model's input shape."""
        shape = tuple(getattr(self.model, "input_shape_", None) or ())
        try:
            why = reservoir.resume_from(snapshot, shape, min_rows=self._judge_floor())
        except SnapshotError as exc:  # the model loaded from these weights: not expected
            why = str(exc)
        if why is not None:
            log.warning("the snapshot's stored sample of older inputs does not fit the model "
                        "(%s): judging on the inputs read from now on", why)
        elif len(reservoir):
            log.info("snapshots are judged on %d older inputs stored with the snapshot resumed "
                     "from, and on those read from now on", len(reservoir))

    def with_sample(self, snapshot: Snapshot) -> Snapshot:
        """``snapshot`` with the reservoir's inputs stored in its weights (``sample.inputs``,
        at most :data:`~oclust.training_worker.monitor.SAMPLE_BYTES`, and ``sample.held``), so
        a worker that resumes from it judges on the older inputs this one had: restarted during
        a burst, it would otherwise judge on the burst alone. No model reads them."""
        return self._reservoir().store_in(snapshot, min_rows=self._judge_floor())

    def publishable(self, snapshot: Snapshot) -> bool:
        """Whether ``snapshot`` may be published: the labels it serves to the reservoir of older
        inputs (about the last :data:`RESERVOIR_WINDOWS` guard windows, at most about
        :data:`RESERVOIR_REACH` samples) are not collapsed.

        The guard judges the labels served while training, over its short window. A model that
        learned a burst of outliers (a sensor fault 10⁴ times the usual, inside the feature
        bound) serves the burst well spread, and the guard passes it; that model serves the
        stream's usual inputs to one cluster, and the reservoir shows it. The rule is the
        guard's: an entropy of at least min(threshold, ½ log n) on the n kept inputs, judged
        once they are at least as many as the guard's smallest window, and after a failed
        judgement :data:`RECOVERY` passing ones in a row, of as many models: the same weights
        again (an idle stream's next checkpoint) keep the last answer, unjudged. Runs in the
        caller's thread (a CPU copy of the snapshot's model), never in the model's own."""
        judged = (snapshot.manifest["sha256"], self._reservoir().offered)  # hashed at create
        if judged == self.judged_last:  # the same weights on the same inputs: no new evidence
            return not self.judged_unhealthy
        self.judged_last = judged
        verdict = self._judge(snapshot)
        if verdict is None:  # cannot judge: the guard decides
            self.judged_unhealthy, self.judge_owed = False, 0
        elif not verdict:
            self.judged_unhealthy, self.judge_owed = True, RECOVERY
        elif self.judge_owed:
            self.judge_owed -= 1
            self.judged_unhealthy = self.judge_owed > 0
        else:
            self.judged_unhealthy = False
        self._set_collapsed_gauge()
        return not self.judged_unhealthy

    def _judge(self, snapshot: Snapshot) -> bool | None:
        """True when ``snapshot`` serves the reservoir healthy, False when collapsed, None when
        it cannot be judged (too few inputs kept, or the judging failed: logged)."""
        k = self.model.n_clusters
        reservoir = self._reservoir()
        x = reservoir.inputs()
        if len(x) < self._judge_floor():
            full = len(reservoir) >= reservoir.capacity
            if full and not self.judge_off_logged:  # full, yet too few: inputs too large
                self.judge_off_logged = True
                log.warning("snapshots are not judged on older inputs: %d inputs of this size "
                            "are kept (the reservoir's memory, or the sample stored with the "
                            "snapshot resumed from), the judge needs %d",
                            len(x), self._judge_floor())
            return None
        try:
            model = OnlineClusterer.from_snapshot(snapshot, device="cpu", verify=False)
            labels = model.predict(x)
        except Exception as exc:  # it trained on them, so this is unexpected: the guard decides
            log.warning("could not judge the snapshot on the reservoir of older inputs: %s", exc)
            return None
        entropy = model_metrics.entropy(model_metrics.cluster_distribution(labels, k))
        self.metrics.reservoir_hard_entropy.set(entropy)
        return self.guard.passes(entropy, len(x))

    def served_kl_star(self) -> float:
        """KL(served-label shares of the guard's window || the model's prior), nats."""
        shares = self.guard.window_shares()
        if not sum(shares):
            return math.nan
        return model_metrics.kl_star(shares, self.prior())

    def prior(self) -> np.ndarray:
        """The model's current cluster prior."""
        return self.model.prior_

    def _collapsed(self, report: StepReport) -> None:
        g = self.guard
        self.metrics.collapse_events.inc()
        log.error(
            "COLLAPSE: served hard entropy over the last %d samples below %.3f nats for %d "
            "batches in a row (last %.3f, max log K = %.3f; training labels of the last batch "
            "%.3f); publishing stopped",
            g.window_size(self.model.n_clusters), g.threshold, g.patience,
            g.window_entropy(), self.model_max_entropy(), report.train_hard_entropy,
        )
        restored, model = None, self.model
        if self.restore and self.healthy is not None and self.restores < MAX_RESTORES:
            model = self.restore_healthy(self.healthy)
            restored = self.healthy
            self.restores += 1
            g.reset()
            self.steps_since_snapshot = 0
            log.warning(
                "collapse guard restored the weights of healthy snapshot version %d "
                "(samples_seen %d); training continues from them",
                self.healthy.version, self.healthy.meta.samples_seen,
            )
        elif self.restore and self.healthy is not None:
            log.warning(
                "collapse guard: the weights of snapshot version %d collapsed again after %d "
                "restores, so the stream itself has changed; training goes on without "
                "restoring, and publishing resumes once the served labels are healthy",
                self.healthy.version, self.restores)
        elif self.restore:
            log.warning("collapse guard: no healthy snapshot to restore yet")
        if self.hooks.on_collapse is not None:
            self.hooks.on_collapse(model, restored)

    def restore_healthy(self, healthy: Snapshot) -> OnlineClusterer:
        """Put ``healthy``'s weights back; returns the model now trained."""
        self.model = OnlineClusterer.from_snapshot(healthy, device=self.model.device)
        return self.model

    def model_max_entropy(self) -> float:
        """log K."""
        return math.log(self.model.n_clusters)

    def snapshot_metrics(
        self, extra: dict[str, float] | None = None
    ) -> dict[str, float | list[float]]:
        """Metrics recorded in a snapshot's manifest.

        ``hard_entropy`` and ``kl_star`` are the served labels' over the guard's window (what
        the guard judged), ``train_hard_entropy`` and ``train_kl_star`` the regulariser's labels
        of the last batch, ``shares`` the served cluster shares of the recent samples.
        """
        out: dict[str, float | list[float]] = {}
        if self.last is not None:
            out |= {"loss": self.last.loss, "train_hard_entropy": self.last.train_hard_entropy,
                    "train_kl_star": self.last.train_kl_star}
        entropy, kl = self.guard.window_entropy(), self.served_kl_star()
        if math.isfinite(entropy) and math.isfinite(kl):
            out |= {"hard_entropy": entropy, "kl_star": kl}
        out |= self.quality.scores()
        out["collapse_events"] = float(self.guard.events)
        out["shares"] = self.cluster_shares()
        return out | (extra or {})

    def cluster_shares(self) -> list[float]:
        """Share of each cluster among the last ``SHARE_WINDOW`` served assignments."""
        k = self.model.n_clusters
        if not self.recent:
            return [0.0] * k
        counts = np.bincount(np.fromiter(self.recent, np.int64, len(self.recent)), minlength=k)
        return (counts[:k] / counts.sum()).round(6).tolist()

    def snapshot(self, offsets: dict[str, int], extra: dict[str, float] | None = None,
                 offset_state: OffsetState | None = None) -> Snapshot:
        """The model as a snapshot covering ``offsets`` (``{"topic:partition": next}``), and
        ``offset_state`` beyond them (:data:`oclust.model.snapshot.OffsetState`)."""
        return self.model.to_snapshot(offsets=offsets, metrics=self.snapshot_metrics(extra),
                                      offset_state=offset_state)

    def published(self, snapshot: Snapshot) -> None:
        """Remember a published (healthy) snapshot as the one to restore."""
        self.healthy = snapshot
        self.steps_since_snapshot = 0
        self.restores = 0
        self._set_collapsed_gauge()

    @property
    def failure(self) -> BaseException | None:
        """Why the model's owner is gone (a training process's trainer); ``None`` here."""
        return None

    @property
    def can_snapshot(self) -> bool:
        """The model has trained at least once."""
        return self.model.is_fitted

    def describe(self) -> dict[str, Any]:
        """A few facts for logs."""
        return {"samples_seen": self.model.samples_seen_, "steps": self.model.steps_,
                "collapse_events": self.guard.events}
