"""Starting or joining Ray, and sizing work from the cluster's resources."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Ray's single-node mode: every service on 127.0.0.1 (see init_ray).
LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address`` / ``RAY_ADDRESS``, else start a local Ray on 127.0.0.1.

    A local Ray must not listen on the machine's public interfaces: Ray's services run any
    code sent to them. In Ray 2.x the single-node "local cluster" mode is the one that keeps
    every service on loopback, so we ask for it unless the user set the variable otherwise.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        # Read by Ray's processes at start-up, and by this process when ray is first imported.
        os.environ.setdefault(LOOPBACK_ONLY_ENV, "0")
    import ray
    from ray._private import ray_constants

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # ray was imported before the variable was set (e.g. by a test runner): apply it here too,
    # or this driver would advertise the machine's public address to the local Ray.
    ray_constants.ENABLE_RAY_CLUSTER = os.environ[LOOPBACK_ONLY_ENV] not in ("0", "false", "False")
    # The dashboard hosts the state API that Ray Train's controller polls; it binds to loopback.
    ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True)
    log.info("started a local Ray on 127.0.0.1: %s", ray.cluster_resources())


@dataclass(frozen=True)
class ActorPlan:
    """How many model actors to run and what each one asks Ray for."""

    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    torch_threads: int


def plan_actors(resources: dict, *, actors: int | None = None, cpus_per_actor: float | None = None,
                gpus_per_actor: float | None = None) -> ActorPlan:
    """Size the model-actor pool from the cluster's resources.

    With GPUs: one actor per GPU share. On CPU: leave room for the read/decode tasks (an
    actor pool that takes every CPU starves them and the pipeline hangs without an error),
    and give each actor a fair share of the cores as torch threads so actors do not
    oversubscribe the machine.
    """
    cpus = float(resources.get("CPU", 1))
    gpus = float(resources.get("GPU", 0))
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if gpus >= 1 else 0.0
    if gpus_per_actor > 0:
        n = actors or max(1, int(gpus // gpus_per_actor))
        c = cpus_per_actor if cpus_per_actor is not None else 1.0
        return ActorPlan(n, c, gpus_per_actor, max(1, int(c)))
    c = cpus_per_actor if cpus_per_actor is not None else max(1.0, cpus // 8)
    free_for_actors = max(c, cpus - max(1.0, cpus * 0.25))
    n = actors or max(1, int(free_for_actors // c))
    if n * c >= cpus:
        raise ValueError(f"{n} actors x {c} CPUs takes all {cpus:g} CPUs and would starve the readers; "
                         "use fewer --actors or a smaller --cpus-per-actor")
    return ActorPlan(n, c, 0.0, max(1, round(cpus / n)))
