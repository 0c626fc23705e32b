"""Planning model actors and their GPUs from the cluster, the autoscaler and the flags."""

from __future__ import annotations

import pytest

from hcdlib.errors import UserError
from hcdlib.raykit.cluster import gpus_to_plan, is_fixed, plan_actors


def test_actor_plan_leaves_cpu_for_reads():
    # 2 cores: two single-threaded actors whose CPU requests leave one CPU to the readers
    plan = plan_actors({"CPU": 2})
    assert (plan.actors, plan.cpus_per_actor, plan.gpus_per_actor, plan.torch_threads) == (2, 0.5, 0, 1)
    big = plan_actors({"CPU": 64})
    assert big.actors * big.torch_threads == 64 and big.actors * big.cpus_per_actor <= 48
    assert plan_actors({"CPU": 1}).cpus_per_actor == 0  # a 1-core laptop: the reader keeps its CPU
    mine = plan_actors({"CPU": 2}, actors=1)
    assert (mine.actors, mine.cpus_per_actor, mine.torch_threads) == (1, 1, 2)
    gpu = plan_actors({"CPU": 16, "GPU": 4})  # two actors share each GPU
    assert gpu.actors == 8 and gpu.gpus_per_actor == 0.5 and gpu.read_cpus == 8
    whole = plan_actors({"CPU": 16, "GPU": 4}, gpus_per_actor=1)
    assert whole.actors == 4 and whole.gpus_per_actor == 1
    # GPUs an autoscaler may still add count (gpus_to_plan), not only those up now
    assert plan_actors({"CPU": 16}, gpus=4.0).actors == 8
    with pytest.raises(UserError, match="would starve them"):
        plan_actors({"CPU": 2}, actors=2, cpus_per_actor=1)


def test_gpus_a_local_ray_does_not_have_are_refused_and_a_cluster_may_still_add_them(caplog, monkeypatch):
    """--gpus-per-actor 1 (or --gpus-per-worker 1) on a laptop waited for a GPU for ever, without a word."""
    import logging

    from hcdlib.raykit.cluster import check_gpus, is_local

    asked = "model actors: 1 x 1 GPU (--actors, --gpus-per-actor)"
    with pytest.raises(UserError, match=r"model actors: 1 x 1 GPU \(--actors, --gpus-per-actor\): 1 GPUs in all, and "
                                        r"this machine's Ray has 0, so they would wait for ever; ask for fewer, or 0"):
        check_gpus({"CPU": 2}, 1.0, local=True, asked=asked)
    caplog.set_level(logging.WARNING)
    check_gpus({"CPU": 2, "GPU": 1}, 2.0, local=False, asked=asked)  # an autoscaler may add GPU nodes
    assert "2 GPUs in all, and the Ray cluster has 1 now; they wait until GPU nodes join" in caplog.text
    caplog.clear()
    for need in (0.0, 1.0):
        check_gpus({"CPU": 2, "GPU": 1}, need, local=True, asked=asked)
    assert not caplog.text
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert is_local(None) and not is_local("127.0.0.1:6379")


def test_gpu_counts_come_from_the_autoscaler_or_flags_never_from_what_is_up():
    kw = {"flags": "--actors and --gpus-per-actor"}
    up_now = {"CPU": 8}  # the head of cluster/aws.yaml, before any GPU node joined
    assert gpus_to_plan(up_now, {"CPU": 72, "GPU": 8}, fixed=False, per=None, count=None, **kw) == 8
    assert gpus_to_plan({"CPU": 16, "GPU": 2}, None, fixed=False, per=None, count=None, **kw) == 2
    assert gpus_to_plan(up_now, None, fixed=False, per=1, count=4, **kw) == 4
    assert gpus_to_plan(up_now, None, fixed=False, per=0, count=None, **kw) == 0
    with pytest.raises(UserError, match=r"no GPU node up now .* reports no autoscaling limits.*give --actors and "
                                        r"--gpus-per-actor"):
        gpus_to_plan(up_now, None, fixed=False, per=1, count=None, **kw)
    with pytest.raises(UserError, match="has no limit on GPUs"):
        gpus_to_plan(up_now, {"GPU": 2**63 - 1}, fixed=False, per=None, count=None, **kw)
    assert gpus_to_plan({"CPU": 2}, None, fixed=True, per=None, count=None, **kw) == 0  # this machine's Ray
    assert is_fixed("127.0.0.1:6379") and not is_fixed("10.0.0.5:6379")
    plan = plan_actors(up_now, gpus=8.0)
    assert (plan.actors, plan.gpus_per_actor) == (16, 0.5)
