"""oclust's training worker: Kafka in, online training, versioned snapshots out.

Modules:

| module | what |
| --- | --- |
| ``store`` | snapshot stores (Redis, directory) and ``open_store(url, namespace, keep)`` |
| ``codec`` | sample/reading messages: JSON and float32 decoding, validation reasons, encoders |
| ``windows`` | per-device sliding windows from readings (C×T samples) |
| ``batching`` | the queue between decoding and training, with per-partition pending offsets |
| ``trainer`` | the model, the collapse guard and live quality, run in the training thread |
| ``trainproc`` | the model in a training process fed through shared memory (the default) |
| ``trainchild`` | the training process's side: the model and its commands |
| ``monitor`` | collapse guard, live ACC/NMI window, Prometheus metrics |
| ``lease`` | one active trainer per namespace (Redis SET NX PX, or a lock file) |
| ``kafka`` | topics, committed offsets, the dead-letter producer |
| ``worker`` | ``TrainingWorker`` behind ``oclust worker``: the lease, standby, signals |
| ``resume`` | the model a lease holder resumes from, the fresh-start rule, offset checks |
| ``loop`` | the active phase: fetch, ingest, train, checkpoint, commit, rebalance |
| ``ring`` | the training process's shared-memory ring: names and sizes |
| ``ledger`` | offsets fetched, covered by a snapshot, committable; crash-loop marks |
| ``ingest`` | the two decoding strategies (samples, readings) behind one Protocol |
| ``stream`` | the consumer/producer Protocols and the in-process stream of ``oclust up`` |
| ``producer`` | the replay producer behind ``oclust produce`` |
| ``offline`` | offline training to a snapshot behind ``oclust train`` |
| ``settings`` | ``WorkerSettings`` (pydantic-settings, ``OCLUST_*``) |
| ``devbroker`` | a local Tansu Kafka broker for tests and benchmarks |

Example:
    >>> from oclust.training_worker.store import open_store
    >>> open_store("redis://127.0.0.1:6379/0", namespace="oclust").namespace
    'oclust'
"""
