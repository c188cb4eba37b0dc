"""tf.distribute strategies for training: one device, several GPUs, or several machines.

The cluster of a multi-worker run is described, as TensorFlow expects, by the `TF_CONFIG`
environment variable: `{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker",
"index": i}}` (optionally with a `chief` task). The chief (task `chief`, or worker 0 when there
is none) is the one that writes the run folder.
"""

from __future__ import annotations

import json
import os

import tensorflow as tf

from stitchnet_tf.errors import DataError
from stitchnet_tf.options import STRATEGIES

_TRAINING_TASKS = ("chief", "worker")


def tf_config() -> dict | None:
    """The parsed `TF_CONFIG` environment variable, or None when it is unset or empty."""
    text = os.environ.get("TF_CONFIG", "").strip()
    if not text:
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(None, f"TF_CONFIG is not valid JSON ({e.msg})") from None
    if not isinstance(config, dict) or not isinstance(config.get("cluster", {}), dict):
        raise DataError(None, 'TF_CONFIG must be a JSON object with a "cluster" object')
    return config


def cluster_workers(config: dict | None = None) -> int:
    """How many training tasks (chief + workers) TF_CONFIG names; 1 without TF_CONFIG."""
    config = tf_config() if config is None else config
    if not config:
        return 1
    cluster = config.get("cluster", {})
    return sum(len(cluster.get(t, [])) for t in _TRAINING_TASKS) or 1


def is_chief(config: dict | None = None) -> bool:
    """Whether this process writes the run folder: task `chief`, or worker 0 without a chief.

    True without TF_CONFIG (a single process) and for a cluster-less TF_CONFIG.
    """
    config = tf_config() if config is None else config
    if not config or not config.get("task"):
        return True
    task = config["task"]
    kind, index = task.get("type"), int(task.get("index", 0))
    if kind == "chief":
        return True
    return kind == "worker" and index == 0 and not config.get("cluster", {}).get("chief")


def _check_multi_worker(config: dict | None) -> None:
    if config is None:
        raise DataError(None, "--strategy multi-worker needs the TF_CONFIG environment variable")
    cluster, task = config.get("cluster", {}), config.get("task")
    if not any(cluster.get(t) for t in _TRAINING_TASKS):
        raise DataError(None, 'TF_CONFIG names no "worker" (or "chief") addresses in "cluster"')
    if not isinstance(task, dict) or task.get("type") not in _TRAINING_TASKS:
        raise DataError(None, 'TF_CONFIG needs a "task" of type "chief" or "worker" with an index')
    try:
        index = int(task.get("index", 0))
    except (TypeError, ValueError):
        index = -1
    if not 0 <= index < len(cluster.get(task["type"], [])):
        raise DataError(
            None, f"TF_CONFIG task index {task.get('index')!r} is not in the {task['type']} list"
        )


def make_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """The strategy called `name` (one of `STRATEGIES`); create it before any other TF work.

    - `auto`: multi-worker when TF_CONFIG names several workers, else mirrored when several
      GPUs are visible, else TensorFlow's default strategy (one device);
    - `one-device`: the first GPU, else the CPU;
    - `mirrored`: synchronous data parallelism over all GPUs, or, without GPUs, over the
      logical CPU devices (one replica unless the CPU was split into several);
    - `multi-worker`: synchronous data parallelism over the cluster in TF_CONFIG (and each
      worker's GPUs).
    """
    if name not in STRATEGIES:
        raise DataError(None, f"unknown strategy {name!r}: use one of {', '.join(STRATEGIES)}")
    config = tf_config()
    if name == "auto":
        if cluster_workers(config) > 1:
            name = "multi-worker"
        elif len(tf.config.list_physical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            return tf.distribute.get_strategy()
    if name == "one-device":
        gpu = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpu[0].name if gpu else "/cpu:0")
    if name == "mirrored":
        if tf.config.list_logical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(
            cpus, cross_device_ops=tf.distribute.ReductionToOneDevice()
        )
    _check_multi_worker(config)
    return tf.distribute.MultiWorkerMirroredStrategy()


def num_replicas(strategy: tf.distribute.Strategy | None = None) -> int:
    """Replicas taking part in each step (1 for the default strategy)."""
    return (strategy or tf.distribute.get_strategy()).num_replicas_in_sync


def describe(strategy: tf.distribute.Strategy) -> str:
    """What a run trains on, in one line: the devices (GPU names, or the CPU and its cores),
    the strategy and its replicas, e.g. `CPU (2 cores); default strategy, 1 replica`."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        names = []
        for gpu in gpus:
            try:
                names.append(tf.config.experimental.get_device_details(gpu)["device_name"])
            except (KeyError, ValueError, RuntimeError):
                names.append(gpu.name)
        device = "GPU " + ", ".join(f"{n} x {names.count(n)}" for n in dict.fromkeys(names))
    else:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
        device = f"CPU ({cores} core{'s' if cores != 1 else ''}, no GPU)"
    kind = type(strategy).__name__
    kind = "default strategy" if kind.startswith("_Default") else kind
    replicas = num_replicas(strategy)
    workers = f" over {cluster_workers()} workers" if is_multi_worker(strategy) else ""
    return f"{device}; {kind}, {replicas} replica{'s' if replicas != 1 else ''}{workers}"


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    """Whether `strategy` spans several processes (its collectives need every worker)."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and (
        strategy.extended._in_multi_worker_mode()
    )


def broadcast_from_chief(strategy: tf.distribute.Strategy, values: list) -> list:
    """The chief's (replica 0's) values of a list of tensors/variables, on every worker.

    For a multi-worker run whose model was loaded (resumed) only where the run folder is.
    """
    if num_replicas(strategy) == 1 or not values:
        return [tf.convert_to_tensor(v) for v in values]

    dtypes = [tf.as_dtype(getattr(v, "dtype", tf.float32)) for v in values]

    def first_only():  # float64 holds every value exactly (int64 up to 2**53)
        ctx = tf.distribute.get_replica_context()
        first = ctx.replica_id_in_sync_group == 0
        parts = [
            tf.where(first, tf.cast(v, tf.float64), tf.zeros_like(tf.cast(v, tf.float64)))
            for v in values
        ]
        return ctx.all_reduce(tf.distribute.ReduceOp.SUM, parts)

    reduced = strategy.experimental_local_results(strategy.run(tf.function(first_only)))[0]
    return [tf.cast(r, d) for r, d in zip(reduced, dtypes, strict=True)]


def share_chief_batchnorm(model) -> int:
    """Give every worker of a multi-worker run the chief's BatchNorm moving statistics.

    For after `models.base.recalibrate_batchnorm`, which each worker runs on the batches it
    reads: without this the workers' inference-mode models, and their choice of best epoch,
    drift apart. Returns the number of variables set (0 outside a multi-worker run).
    """
    from stitchnet_tf.models.base import batchnorm_layers

    strategy = getattr(model, "distribute_strategy", None)
    if strategy is None or not is_multi_worker(strategy):
        return 0
    moving = [v for la in batchnorm_layers(model) for v in (la.moving_mean, la.moving_variance)]
    for variable, value in zip(moving, broadcast_from_chief(strategy, moving), strict=True):
        variable.assign(value)
    return len(moving)


def synchronize_batchnorm(model, on: bool = True) -> int:
    """Make every BatchNormalization layer of `model` use global-batch statistics in training.

    With several replicas each replica otherwise normalises with the statistics of its own
    share of the batch, so results would depend on the replica count. Returns the number of
    layers changed.
    """
    from stitchnet_tf.models.base import batchnorm_layers

    norms = batchnorm_layers(model)
    for layer in norms:
        layer.synchronized = on
    return len(norms)
