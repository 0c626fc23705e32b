"""Starting or joining Ray, and sizing work from the cluster's resources."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from hcdlib.console import quiet_ray_data, verbose
from hcdlib.errors import UserError

log = logging.getLogger(__name__)

# Ray's single-node mode: every service on 127.0.0.1 (see init_ray).
LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def init_ray(address: str | None = None, *, num_cpus: int | None = None, dashboard: bool = False) -> None:
    """Join the cluster at ``address`` / ``RAY_ADDRESS``, else start a local Ray on 127.0.0.1.

    ``dashboard``: start Ray's dashboard with a local Ray. Ray Train needs it (its controller
    polls the state API the dashboard hosts); scoring does not, and it costs ~1.8 s of start-up.

    A local Ray must not listen on the machine's public interfaces: Ray's services run any
    code sent to them. In Ray 2.x the single-node "local cluster" mode is the one that keeps
    every service on loopback, so we ask for it unless the user set the variable otherwise.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    # A cluster on 127.0.0.1 (cluster/local_cluster.py, a `ray start` on this laptop) runs in the
    # same mode: a driver in cluster mode rewrites 127.0.0.1 to the machine's own address and
    # then waits for a GCS that does not listen there, silently, for ever.
    loopback = not address or _host(address) in ("127.0.0.1", "localhost")
    if loopback:
        # Read by Ray's processes at start-up, and by this process when ray is first imported.
        os.environ.setdefault(LOOPBACK_ONLY_ENV, "0")
    import ray  # Ray only where a job runs
    from ray._private import ray_constants  # Ray only where a job runs

    if ray.is_initialized():
        return
    if loopback:
        # ray was imported before the variable was set (e.g. by a test runner): apply it here too,
        # or this driver would advertise the machine's public address to the local Ray.
        ray_constants.ENABLE_RAY_CLUSTER = os.environ[LOOPBACK_ONLY_ENV] not in ("0", "false", "False")

    # Ray's logs go to its log files; on the console only with --verbose (hcdlib.console).
    quiet = {"log_to_driver": verbose(), "logging_level": logging.INFO if verbose() else logging.ERROR}
    if address:
        check_address(address)
    try:
        with _quiet_core_logs(not verbose()):
            if address:
                ray.init(address=address, **quiet)
            else:  # when started, the dashboard binds to loopback like everything else
                ray.init(num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1", **quiet)
    except ConnectionError as e:  # something listens there, but it did not take us in
        if not address:
            raise
        if "AuthToken" in str(e.__cause__):  # Ray's AuthenticationError, as text inside the cause
            raise UserError(f"the Ray cluster at {address} refused this process's authentication token: set "
                            "RAY_AUTH_MODE=token and give it the cluster's token (~/.ray/auth_token or "
                            "RAY_AUTH_TOKEN)") from e
        raise UserError(f"could not join the Ray cluster at {address}: {str(e).splitlines()[0]}; "
                        "--verbose shows Ray's log") from e
    quiet_ray_data()
    if address:
        return
    res = ray.cluster_resources()
    log.info("started a local Ray on 127.0.0.1: %g CPUs, %g GPUs", res.get("CPU", 0), res.get("GPU", 0))


def _host(address: str) -> str:
    """The host part of a Ray address (``ray://h:p``, ``h:p``, ``http://h:p``)."""
    return address.split("://")[-1].rsplit(":", 1)[0]


ADDRESS_CONNECT_TIMEOUT_S = 5.0


def check_address(address: str) -> None:
    """Refuse a Ray address where nothing listens, before ``ray.init`` waits on it.

    ``ray.init`` retries a GCS that is not there for minutes with no word on the console
    (Ray 2.60: over two minutes at a closed port on 127.0.0.1). ``auto`` and ``local`` are
    Ray's own lookups and are left to it.
    """
    host, _, port = address.split("://")[-1].rpartition(":")
    if address in ("auto", "local") or not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=ADDRESS_CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        raise UserError(f"no Ray cluster answers at {address} (--address or RAY_ADDRESS): "
                        f"{e.strerror or e}; start it (`ray start --head`) or give its address") from e


# CPUs one read/decode task asks for (hcdlib.raykit.pipeline): a small request, so that a read fits in
# the fraction of a node's CPU that fractional actor requests leave over (a two-node cluster with
# 1 + 2 CPUs and three 0.67-CPU actors left 0.33 and 0.67: 1-CPU reads never ran, a silent hang).
READ_TASK_CPUS = 0.25
# CPUs the actor pool must leave to the reads in all.
READ_RESERVE_CPUS = 1.0


# GPUs per model actor where GPUs exist: two actors share each GPU, so that one's host work
# (Arrow to tensor, the copy in, the probabilities out) overlaps the other's kernels.
GPU_SHARE_PER_ACTOR = 0.5
# An autoscaler limit this large means "no limit" (Ray reports sys.maxsize).
_UNLIMITED = 2**62


def is_fixed(address: str | None) -> bool:
    """Whether the Ray that ``address`` names can only have what is up now.

    A Ray this command starts, or one on 127.0.0.1 (cluster/local_cluster.py, a `ray start` on
    this machine): every node is this machine's. Elsewhere an autoscaler may add nodes.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    return not address or _host(address) in ("127.0.0.1", "localhost")


def autoscaler_limits() -> dict | None:
    """The most of each resource the cluster's autoscaler may bring up; None where it reports none.

    Read from the cluster config the autoscaler writes to Ray's GCS (what Ray Train checks its
    workers against), so GPU nodes that are not up yet still count.
    """
    from ray._private.state import state  # Ray only where a job runs

    return state.get_max_resources_from_cluster_config()


def gpus_to_plan(resources: dict, limits: dict | None, *, fixed: bool, per: float | None, count: int | None,
                 flags: str) -> float:
    """GPUs a plan may count on: never only what happens to be up when a job is submitted.

    ``resources``: the Ray's resources now; ``limits``: :func:`autoscaler_limits`; ``fixed``: the
    Ray cannot grow (:func:`is_fixed`); ``per`` and ``count``: the user's GPUs per actor (or
    worker) and actors (or workers), None where not given; ``flags``: their names, for the message.
    A cluster whose GPU count cannot be known (no GPU up, no autoscaler limits) and no flag that
    settles it is refused: a CPU-only plan there would never ask the autoscaler for a GPU.
    """
    now = float(resources.get("GPU", 0))
    if fixed:
        return now
    if limits is not None and float(limits.get("GPU", 0)) < _UNLIMITED:
        return max(now, float(limits.get("GPU", 0)))
    if now > 0:  # GPU nodes are up: a fixed cluster, or an autoscaler that reports no limits
        return now
    if per == 0 or (per and count):
        return per * count if per and count else 0.0
    how = "has no limit on GPUs" if limits is not None else "reports no autoscaling limits"
    raise UserError(f"the Ray cluster has no GPU node up now and its autoscaler {how}, so hcd cannot tell how many "
                    f"GPUs to plan for: give {flags} (e.g. 4 and 1), or a GPU count of 0 to run on CPUs")


def planning_resources(address: str | None, *, per: float | None, count: int | None,
                       flags: str) -> tuple[dict, float]:
    """The joined Ray's resources now, and the GPUs a plan may count on (:func:`gpus_to_plan`)."""
    import ray  # Ray only where a job runs

    resources = ray.cluster_resources()
    fixed = is_fixed(address)
    return resources, gpus_to_plan(resources, None if fixed else autoscaler_limits(), fixed=fixed, per=per,
                                   count=count, flags=flags)


@dataclass(frozen=True)
class ActorPlan:
    """How many model actors to run and what each one asks Ray for."""

    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    torch_threads: int
    read_cpus: float = READ_RESERVE_CPUS  # what the actors' requests leave to the read tasks


def plan_actors(resources: dict, *, actors: int | None = None, cpus_per_actor: float | None = None,
                gpus_per_actor: float | None = None, gpus: float | None = None) -> ActorPlan:
    """Size the model-actor pool from the cluster's resources (``gpus``: :func:`gpus_to_plan`'s count).

    With GPUs: one actor per GPU share (:data:`GPU_SHARE_PER_ACTOR` unless ``gpus_per_actor``).
    On CPU: as many model threads as cores in all, in small actors (one thread each up to 8
    cores). A convolution split over T threads waits at
    every layer for the slowest thread; N single-threaded actors never wait for each other
    (``hcd score``, resnet18, 2 cores, 20,000 patches, alternating runs: 2 actors x 1 thread
    185-191 patches/s, 1 actor x 2 threads 167-171).
    The actors' CPU *requests* stay below the total so that Ray keeps at least one CPU for the
    read/decode tasks: a pool that asks for every CPU starves them and the pipeline hangs
    without an error. Those requests are Ray's bookkeeping; the threads are what run.
    """
    cpus = float(resources.get("CPU", 1))
    gpus = float(resources.get("GPU", 0)) if gpus is None else gpus
    if gpus_per_actor is None:
        gpus_per_actor = GPU_SHARE_PER_ACTOR if gpus >= 1 else 0.0
    if gpus_per_actor > 0:
        n = actors or max(1, int(gpus // gpus_per_actor))
        c = cpus_per_actor if cpus_per_actor is not None else 1.0
        return ActorPlan(n, c, gpus_per_actor, max(1, int(c)), read_cpus=max(0.0, cpus - n * c))
    for_actors = cpus - max(READ_RESERVE_CPUS, cpus * 0.25)  # CPU requests left after the readers' share
    if actors is None and cpus_per_actor is None:
        threads = max(1, int(cpus // 8))
        n = max(1, int(cpus // threads))
        c = max(0.0, for_actors) / n
    else:
        c = cpus_per_actor if cpus_per_actor is not None else max(0.0, for_actors) / actors
        n = actors or (max(1, int(for_actors // c)) if c > 0 else max(1, int(cpus)))
        threads = max(1, round(cpus / n))
    if cpus - n * c < READ_RESERVE_CPUS:
        raise UserError(f"{n} actors x {c:g} CPUs leaves less than {READ_RESERVE_CPUS:g} of {cpus:g} CPUs for the "
                         "readers and would starve them; use fewer --actors or a smaller --cpus-per-actor")
    return ActorPlan(n, round(c, 4), 0.0, threads, read_cpus=round(cpus - n * c, 4))


def is_local(address: str | None) -> bool:
    """Whether a command with ``--address`` ``address`` starts its own Ray (none given, no ``RAY_ADDRESS``)."""
    return not (address or os.environ.get("RAY_ADDRESS"))


def check_gpus(resources: dict, need: float, *, local: bool, asked: str) -> None:
    """Refuse GPU requests a local Ray can never meet; on a cluster, say that they wait for GPU nodes.

    Ray schedules an actor or a Train worker that asks for a GPU only where one is free: on a Ray
    this command started, with fewer GPUs than asked, it waited without a word for ever. A
    cluster's autoscaler may still add GPU nodes (``cluster/aws.yaml`` starts with none).
    """
    have = float(resources.get("GPU", 0))
    if need <= have:
        return
    if local:
        raise UserError(f"{asked}: {need:g} GPUs in all, and this machine's Ray has {have:g}, so they would wait for "
                        "ever; ask for fewer, or 0 to run on the CPU")
    log.warning("%s: %g GPUs in all, and the Ray cluster has %g now; they wait until GPU nodes join", asked, need, have)


@contextlib.contextmanager
def _quiet_core_logs(quiet: bool) -> Iterator[None]:
    """Keep Ray's C++ log lines off the terminal while ``ray.init`` starts this process's core worker.

    Ray 2.60's core worker prints an ERROR line on the driver's terminal for every model actor
    Ray Data creates ("constructor arguments in the object store and max_restarts > 0", a known
    Ray caveat about restarting actors, ray-project/ray#53727, that hcd's resume covers). Unless
    ``--verbose``, the driver's C++ level is FATAL (a level the user set is kept). The core
    worker announces that level on file descriptor 2 as it starts, so for the length of
    ``ray.init`` that descriptor goes to a temporary file, which is shown if ``ray.init`` fails.
    """
    if not quiet or "RAY_BACKEND_LOG_LEVEL" in os.environ:
        yield
        return

    os.environ["RAY_BACKEND_LOG_LEVEL"] = "fatal"
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except ConnectionError:  # init_ray says what to do in one line; --verbose shows Ray's lines
            raise
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            os.write(2, held.read()[-20000:])
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            del os.environ["RAY_BACKEND_LOG_LEVEL"]
