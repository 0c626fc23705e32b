"""A two-node Ray cluster on this machine, on 127.0.0.1 only, for trying ``ray job submit``.

    python cluster/local_cluster.py            # prints the job API address, runs until Ctrl-C
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/demo.py

``ray start --node-ip-address=127.0.0.1`` was seen to advertise the machine's own address, and
Ray's single-node mode keeps loopback but refuses a second ``ray start`` node; Ray's own
``ray.cluster_utils.Cluster`` runs several nodes on 127.0.0.1, so that is what this uses.
Token authentication is on (``RAY_AUTH_MODE=token``; the token is ``~/.ray/auth_token``,
created if missing), and the dashboard / job API listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    """Start the cluster, print its addresses as one JSON line, wait for a signal, stop it."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--head-cpus", type=int, default=1)
    p.add_argument("--worker-cpus", type=int, default=2)
    p.add_argument("--dashboard-port", type=int, default=8265)
    args = p.parse_args()
    os.environ["RAY_AUTH_MODE"] = "token"
    # Single-node mode keeps every service on 127.0.0.1; Cluster still adds nodes in it (only the
    # `ray start --address` CLI refuses to).
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # Ray's own start-up step: makes ~/.ray/auth_token if there is none, never replaces one.
    from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled
    from ray.cluster_utils import Cluster

    ensure_token_if_auth_enabled(create_token_if_missing=True)

    # Both nodes share 127.0.0.1, so each node's agent (which runs submitted jobs) needs its own port.
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": args.head_cpus, "resources": {"hcd_head": 1}, "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": args.dashboard_port,
        "dashboard_agent_listen_port": _free_port()})
    worker = cluster.add_node(num_cpus=args.worker_cpus, resources={"hcd_worker": 1},
                              dashboard_agent_listen_port=_free_port())
    cluster.wait_for_nodes()
    info = {"gcs_address": cluster.address, "dashboard": f"http://127.0.0.1:{args.dashboard_port}",
            "worker_node_id": worker.node_id, "head_node_id": cluster.head_node.node_id,
            # killing this process takes the worker node away (fault tests)
            "worker_raylet_pid": worker.all_processes["raylet"][0].process.pid}
    sys.stdout.write(json.dumps(info) + "\n")
    sys.stdout.flush()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
