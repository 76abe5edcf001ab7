"""Multi-host training: one process per host on the JAX backend, each feeding its own slice of
every global batch to Keras's DataParallel over the devices of all hosts.

    CONVNET_COORDINATOR=host0:1234 CONVNET_NUM_PROCESSES=2 CONVNET_PROCESS_ID=0 \\
        convnet train --distributed ...            # and PROCESS_ID=1 on the other host

Every process reads the same data with the same seed, so every process draws the same global
batches; process i keeps rows [i * B / n, (i + 1) * B / n) of each (Batches' `shard`). Only
process 0 writes checkpoints and publishes; the others wait for it in a final collective, which
also tells them the version it published.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import keras
import numpy as np

from convnet import models
from convnet.train.config import TrainError

COORDINATOR_ENV = "CONVNET_COORDINATOR"  # host:port of process 0's coordination service
NUM_PROCESSES_ENV = "CONVNET_NUM_PROCESSES"  # one process per host
PROCESS_ID_ENV = "CONVNET_PROCESS_ID"  # 0 .. num_processes - 1; 0 publishes


@dataclass(frozen=True)
class Cluster:
    coordinator: str  # host:port
    num_processes: int
    process_id: int


def cluster_from_env(environ: Mapping[str, str] = os.environ) -> Cluster:
    """The cluster named by the CONVNET_* variables; TrainError naming what is missing or bad."""
    missing = [name for name in (COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV)
               if not environ.get(name)]
    if missing:
        raise TrainError("--distributed needs " + ", ".join(missing) + " in the environment "
                         f"(e.g. {COORDINATOR_ENV}=host0:1234 {NUM_PROCESSES_ENV}=2 "
                         f"{PROCESS_ID_ENV}=0)")
    coordinator = environ[COORDINATOR_ENV]
    if ":" not in coordinator:
        raise TrainError(f"{COORDINATOR_ENV} must be host:port, got {coordinator!r}")
    try:
        count, index = int(environ[NUM_PROCESSES_ENV]), int(environ[PROCESS_ID_ENV])
    except ValueError:
        raise TrainError(f"{NUM_PROCESSES_ENV} and {PROCESS_ID_ENV} must be integers") from None
    if count < 1 or not 0 <= index < count:
        raise TrainError(f"{PROCESS_ID_ENV} must be in 0..{NUM_PROCESSES_ENV}-1, got {index} "
                         f"of {count}")
    return Cluster(coordinator, count, index)


def initialize(cluster: Cluster) -> None:
    """Join the cluster (blocks until every process has joined). JAX backend only."""
    if keras.backend.backend() != "jax":
        raise TrainError(f"--distributed needs the JAX backend (KERAS_BACKEND=jax), not "
                         f"{keras.backend.backend()}")
    import jax

    # CPU devices need gloo for collectives across processes; it leaves GPUs' NCCL alone.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=cluster.coordinator,
                               num_processes=cluster.num_processes,
                               process_id=cluster.process_id)


def process_shard() -> tuple[int, int]:
    """(this process's index, the number of processes): (0, 1) unless initialize() ran."""
    if keras.backend.backend() != "jax":
        return 0, 1
    import jax

    return jax.process_index(), jax.process_count()


def is_writer() -> bool:
    """Whether this process writes checkpoints and publishes (process 0)."""
    return process_shard()[0] == 0


@contextlib.contextmanager
def saving_alone() -> Iterator[None]:
    """Lift the distribution while process 0 saves alone: model.save builds a throwaway
    optimizer (saving_lib's attribute skip-set), whose variables a distribution spanning the
    hosts would create collectively, waiting for processes that are not saving."""
    if process_shard()[1] == 1:
        yield
        return
    distribution = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        yield
    finally:
        keras.distribution.set_distribution(distribution)


def share_version(version: int) -> int:
    """Process 0's `version` on every process; the others wait here until process 0 arrives
    (after publishing)."""
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(version)))


def local_copy(model: keras.Model, preset: str) -> keras.Model:
    """The model with its weights on this process alone: a model whose variables span every
    host cannot run on one (evaluation and export run on process 0 only)."""
    clone = models.build(preset, model.output.shape[-1], image_size=models.input_size(model),
                         stats=models.normalisation(model))
    values = {v.path: v.numpy() for v in model.variables}  # replicated: whole on every host
    for variable in clone.variables:
        variable.assign(values[variable.path].astype(variable.dtype))
    return clone
