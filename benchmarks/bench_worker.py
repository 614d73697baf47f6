"""Benchmark: the training worker's Kafka path against bare baselines, on one Tansu broker.

In one run, on the same broker and the same topics (digits replayed as sample messages, once
as JSON and once as float32 with headers):

1. **consume-and-decode** — messages/s of
   - a bare aiokafka consumer that only touches each message's bytes,
   - a bare consumer that also decodes naively (``json.loads`` + ``np.asarray`` per message,
     or ``np.frombuffer`` for float32),
   - the worker's own path (``TrainingLoop.ingest_records``: validation, dead-letter checks, offset
     tracking, queueing), with the queue drained and nothing trained.
   Target: worker ≥ 80% of the bare consumer.
2. **training** — samples/s of ``partial_fit`` on the same batches from memory vs the real
   worker consuming the topic (decode, queue, batch, step in its training process or thread,
   metrics), both after one warm-up step. Each worker run is compared with the mean of a
   memory run right before and right after it (the load of a shared machine drifts); the
   ratio reported is the median of those paired ratios. Target: worker ≥ 80% of memory.

3. **multi-sample messages** — the same digits packed 256 per float32 message (``rows``
   header): the worker's training rate from that topic, and the decode path alone
   (``SampleDecoder.decode_batch`` on fetched-size lists of such messages, samples/s).

Run: ``.venv/bin/python benchmarks/bench_worker.py [--messages 60000] [--train-samples 20000]``
Prints markdown tables; ``--json`` skips the consume-and-decode table and prints one JSON object:
``worker_json_of_memory``, ``worker_f32_of_memory``, ``worker_multi_of_memory`` (ratios of the
training rates) and ``multi_decode_samples_per_s``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiokafka import AIOKafkaConsumer

from oclust.model import OnlineClusterer, StepReport, datasets
from oclust.training_worker.batching import Batch
from oclust.training_worker.codec import SampleDecoder
from oclust.training_worker.devbroker import TansuBroker
from oclust.training_worker.ingest import make_ingest
from oclust.training_worker.kafka import DeadLetters
from oclust.training_worker.lease import make_progress_log
from oclust.training_worker.ledger import OffsetLedger
from oclust.training_worker.loop import TrainingLoop
from oclust.training_worker.monitor import CollapseGuard, WorkerMetrics
from oclust.training_worker.producer import dataset_messages, replay
from oclust.training_worker.resume import FaultMetrics
from oclust.training_worker.settings import WorkerSettings
from oclust.training_worker.store import open_store
from oclust.training_worker.trainer import Trainer, TrainerHooks
from oclust.training_worker.worker import TrainingWorker

BATCH = 256
PER_MESSAGE = 256  # samples per multi-sample message
GROUP_GAP_S = 1e-3  # reports closer than this came in one reply message (a CPU step is ~3 ms)


def _consumer(bootstrap: str, topic: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=f"bench-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False, auto_offset_reset="earliest", session_timeout_ms=1000,
        heartbeat_interval_ms=300, max_partition_fetch_bytes=8 << 20, fetch_max_bytes=64 << 20,
    )


async def _timed_consume(
    bootstrap: str, topic: str, n: int, handle: Callable[[dict], Awaitable[None] | None]
) -> float:
    """Messages/s from the first fetched record to the n-th, calling ``handle`` per fetch."""
    consumer = _consumer(bootstrap, topic)
    await consumer.start()
    seen, t0 = 0, None
    try:
        while seen < n:
            records = await consumer.getmany(timeout_ms=1000, max_records=4 * BATCH)
            if not records:
                continue
            if t0 is None:
                t0 = time.perf_counter()
            out = handle(records)
            if out is not None:
                await out
            seen += sum(len(v) for v in records.values())
    finally:
        await consumer.stop()
    assert t0 is not None
    return seen / (time.perf_counter() - t0)


def _bare(records: dict) -> None:
    for msgs in records.values():
        for m in msgs:
            _ = m.value


def _naive_json(records: dict) -> None:
    for msgs in records.values():
        np.asarray([json.loads(m.value)["features"] for m in msgs], dtype=np.float32)


def _naive_f32(records: dict) -> None:
    for msgs in records.values():
        np.stack([np.frombuffer(m.value, "<f4") for m in msgs])


def _ingesting_loop(bootstrap: str, topic: str) -> Callable[[dict], Awaitable[None]]:
    """The worker's ingest path only: ledger marks, a real decoder and queue, nothing trained."""
    settings = WorkerSettings(bootstrap_servers=bootstrap, topic=topic, metrics_port=-1,
                              store="file:///tmp/oclust-bench-unused")
    metrics = WorkerMetrics()
    trainer = Trainer(OnlineClusterer(n_clusters=10, seed=0), CollapseGuard(0.0, 10), metrics)
    ingest = make_ingest(settings, None)
    store = open_store(settings.store, namespace=settings.namespace)
    ledger = OffsetLedger(topic, progress=make_progress_log(store))

    class _NoHighwater:
        def highwater(self, tp: object) -> None:
            return None

    loop = TrainingLoop(
        settings, trainer, ingest, ledger, _NoHighwater(),  # type: ignore[arg-type]
        DeadLetters(None, "unused"),  # type: ignore[arg-type]  # no bad messages here
        None, store, None, metrics, FaultMetrics(metrics.registry),  # type: ignore[arg-type]
        asyncio.Event(), asyncio.Event(),
    )

    async def ingest_records(records: dict) -> None:
        await loop.ingest_records(records)
        ingest.queue.take(len(ingest.queue))  # drained: nothing trained

    return ingest_records


async def consume_rates(bootstrap: str, topic: str, n: int, binary: bool, reps: int) -> dict:
    naive = _naive_f32 if binary else _naive_json
    rows: dict[str, list[float]] = {"bare": [], "naive": [], "worker": []}
    for _ in range(reps):  # interleaved, so drift of the machine hits all three alike
        rows["bare"].append(await _timed_consume(bootstrap, topic, n, _bare))
        rows["naive"].append(await _timed_consume(bootstrap, topic, n, naive))
        rows["worker"].append(await _timed_consume(bootstrap, topic, n,
                                                   _ingesting_loop(bootstrap, topic)))
    return {k: statistics.median(v) for k, v in rows.items()}


def memory_rate(X: np.ndarray, n: int, threads: int) -> float:
    """partial_fit samples/s on the batches the worker sees, after one warm-up step."""
    torch.set_num_threads(threads)  # per thread, as in the worker's training thread
    clf = OnlineClusterer(n_clusters=10, seed=0, device="cpu")
    clf.partial_fit(X[:BATCH])
    t0 = time.perf_counter()
    done = 0
    for start in range(BATCH, n, BATCH):
        done += clf.partial_fit(X[start : start + BATCH]).last_step_.n
    return done / (time.perf_counter() - t0)


async def worker_rate(
    bootstrap: str, topic: str, n: int, threads: int | None, device: str = "cpu"
) -> float:
    """Samples/s of the real worker on the topic, from the end of its first step to the step
    that completes ``n`` samples (the short batch the stop flushes is not timed).

    The training process may answer a few steps in one message, so the window starts and ends
    at whole groups of reports (reports less than ``GROUP_GAP_S`` apart): the steps that
    arrived with the first are left out with it, and those that arrived with the n-th are in.
    """
    marks: list[tuple[float, int]] = []
    worker: TrainingWorker | None = None
    loop = asyncio.get_running_loop()

    def on_step(report: StepReport, batch: Batch) -> None:
        marks.append((time.perf_counter(), report.n))
        if sum(k for _, k in marks) >= n:
            loop.call_soon_threadsafe(worker.request_stop)  # type: ignore[union-attr]

    store = f"file:///tmp/oclust-bench-{uuid.uuid4().hex[:8]}"
    settings = WorkerSettings(
        bootstrap_servers=bootstrap, topic=topic, store=store, namespace="bench",
        n_clusters=10, batch_size=BATCH, batch_timeout=5, snapshot_interval=3600,
        metrics_port=-1, session_timeout_ms=1000, seed=0, device=device, torch_threads=threads,
        group_id=f"bench-{uuid.uuid4().hex[:8]}",
    )
    worker = TrainingWorker(settings, hooks=TrainerHooks(on_step=on_step))
    await worker.run()
    times = [t for t, _ in marks]
    first = _group_end(times, 0)
    last = _group_end(times, next(i for i in range(len(marks))
                                  if sum(k for _, k in marks[: i + 1]) >= n))
    counted = marks[first + 1 : last + 1]
    return sum(k for _, k in counted) / (times[last] - times[first])


def _group_end(times: list[float], i: int) -> int:
    """The last index of the group of reports ``i`` arrived with (gaps under GROUP_GAP_S)."""
    while i + 1 < len(times) and times[i + 1] - times[i] < GROUP_GAP_S:
        i += 1
    return i


def multi_decode_rate(seconds: float = 2.0) -> float:
    """Samples/s of ``decode_batch`` on lists of 16 multi-sample messages (a typical fetch)."""
    msgs = list(dataset_messages("digits", loop=True, limit=16, samples_per_message=PER_MESSAGE))
    values, headers = [m.value for m in msgs], [m.headers for m in msgs]
    dec = SampleDecoder(shape=(64,))
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        batch = dec.decode_batch(values, headers)
        assert not batch.rejects
        done += len(batch.features)
    return done / (time.perf_counter() - t0)


def _row(name: str, value: float, base: float | None = None) -> str:
    share = f"{100 * value / base:.0f}%" if base else ""
    return f"| {name} | {value:,.0f} | {share} |"


async def main_async(args: argparse.Namespace) -> None:
    X, _ = datasets.load("digits")
    with TansuBroker() as broker:
        bs = broker.bootstrap_servers
        topics = {False: f"bench-json-{uuid.uuid4().hex[:6]}",
                  True: f"bench-f32-{uuid.uuid4().hex[:6]}"}
        multi_topic = f"bench-multi-{uuid.uuid4().hex[:6]}"
        for binary, topic in topics.items():
            await replay(bs, topic, "digits", loop=True, limit=args.messages, binary=binary,
                         progress=False)
        # digits packs into 7 full messages and one of 5 samples per pass: enough for n samples
        await replay(bs, multi_topic, "digits", loop=True, progress=False,
                     limit=8 * (args.messages // 1797 + 1), samples_per_message=PER_MESSAGE)
        say = (lambda *a, **k: None) if args.json else print
        say(f"Tansu broker, {args.messages:,} digits messages per topic, median of "
            f"{args.reps} interleaved runs\n")
        say("| consume-and-decode | messages/s | of bare |")
        say("| --- | ---: | ---: |")
        for binary, topic in ({} if args.json else topics).items():
            enc = "f32" if binary else "JSON"
            rates = await consume_rates(bs, topic, args.messages, binary, args.reps)
            print(_row(f"bare aiokafka ({enc})", rates["bare"]))
            print(_row(f"bare + naive decode ({enc})", rates["naive"], rates["bare"]))
            print(_row(f"worker path ({enc})", rates["worker"], rates["bare"]))
            print(f"| worker vs bare + naive decode ({enc}) | | "
                  f"{100 * rates['worker'] / rates['naive']:.0f}% |")
        n = min(args.train_samples, args.messages) // BATCH * BATCH  # whole batches only
        Xn = np.resize(X, (n, X.shape[1])).astype(np.float32)  # digits looped, as produced
        train: dict[str, list[float]] = {"memory": [], "JSON": [], "f32": [], "multi": []}
        ratios: dict[str, list[float]] = {"JSON": [], "f32": [], "multi": []}
        runs = (("JSON", topics[False]), ("f32", topics[True]), ("multi", multi_topic))
        for _ in range(args.reps):
            for enc, topic in runs:
                # the baseline right before and after each worker run (the load of a shared
                # machine drifts); in a thread, like the worker's steps
                mem_before = await asyncio.to_thread(memory_rate, Xn, n, args.torch_threads)
                rate = await worker_rate(bs, topic, n, args.torch_threads)
                mem_after = await asyncio.to_thread(memory_rate, Xn, n, args.torch_threads)
                train["memory"] += [mem_before, mem_after]
                train[enc].append(rate)
                ratios[enc].append(rate / statistics.mean((mem_before, mem_after)))
        mem = statistics.median(train["memory"])
        rates = {enc: statistics.median(train[enc]) for enc in ("JSON", "f32", "multi")}
        of_memory = {enc: statistics.median(ratios[enc]) for enc in ("JSON", "f32", "multi")}
        decode = multi_decode_rate()
        if args.json:
            print(json.dumps({
                "worker_json_of_memory": round(of_memory["JSON"], 3),
                "worker_f32_of_memory": round(of_memory["f32"], 3),
                "worker_multi_of_memory": round(of_memory["multi"], 3),
                "multi_decode_samples_per_s": round(decode),
            }))
            return
        print(f"\n| training (batch 256, default model, torch threads "
              f"{args.torch_threads}) | samples/s | of memory |")
        print("| --- | ---: | ---: |")
        print(_row("partial_fit from memory", mem))
        names = {"JSON": "JSON", "f32": "f32", "multi": f"f32, {PER_MESSAGE} samples per message"}
        for enc, name in names.items():
            print(f"| worker from Kafka ({name}) | {rates[enc]:,.0f} | "
                  f"{100 * of_memory[enc]:.0f}% |")
        print(f"\nmulti-sample decode alone ({PER_MESSAGE} per message): {decode:,.0f} samples/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=60_000)
    parser.add_argument("--train-samples", type=int, default=20_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="intra-op threads (1: the broker and the loop need the other core)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object with the training ratios, nothing else")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    import logging

    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
