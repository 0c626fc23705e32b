import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO

CLUSTER = REPO / "cluster"
RAY_CLI = str(Path(sys.executable).parent / "ray")  # the real `ray` command of this environment
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))


def test_aws_launcher_config_passes_rays_schema():
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    validate_config(fillout_defaults(config))  # what `ray up` runs before launching anything
    head = " ".join(config["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "--dashboard-host=127.0.0.1" in head
    assert all("RAY_AUTH_MODE=token" in c for c in config["worker_start_ray_commands"] if "ray start" in c)
    for node in config["available_node_types"].values():
        assert "IamInstanceProfile" in node["node_config"]  # S3 through the instance role, no keys


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifests_have_what_kuberay_requires(path):
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob")
    cluster = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"  # the dashboard stays inside the cluster
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and group["template"]["spec"]["containers"][0]["resources"]["limits"]
    if doc["kind"] == "RayJob":
        script = re.match(r"python (\S+\.py)", doc["spec"]["entrypoint"]).group(1)
        assert (REPO / script).exists(), f"{path.name}: entrypoint {script} is not in the repo"


def test_the_image_pins_a_torch_built_for_its_own_cuda_and_nodes_install_nothing_at_boot():
    """A torch whose CUDA does not match the driver cannot start it: the image pins both to one CUDA."""
    docker = (CLUSTER / "Dockerfile").read_text()
    cuda = re.search(r"^ARG CUDA=(cu\d+)$", docker, re.M).group(1)
    assert "FROM rayproject/ray:2.60.0-py311-${CUDA}" in docker
    pin = re.search(r"pip install .*torch==\S+ torchvision==\S+ --index-url https://download.pytorch.org/whl/\$\{CUDA\}",
                    docker)
    assert pin and docker.index(pin.group(0)) < docker.index("-e /home/ray/hcd") and cuda
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    assert config["docker"]["image"] and "--gpus all" in config["docker"]["worker_run_options"]
    boot = " ".join(config.get("setup_commands", []) + config.get("worker_setup_commands", []))
    assert "pip install" not in boot


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_gpu_pods_tolerate_the_gpu_taint_and_select_gpu_nodes(path):
    doc = yaml.safe_load(path.read_text())
    cluster = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    for group in cluster["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        if "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]:
            continue
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["nodeSelector"]


def test_no_credentials_in_the_repository():
    pattern = re.compile(r"AKIA[0-9A-Z]{16}|aws_secret_access_key\s*[:=]\s*\S+|RAY_AUTH_TOKEN\s*[:=]\s*\S+", re.I)
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    for name in tracked:
        path = REPO / name
        if path.suffix in (".py", ".yaml", ".yml", ".md", ".toml", "") and path.is_file() and path != Path(__file__):
            assert not pattern.search(path.read_text(errors="ignore")), f"credential-like text in {name}"


def _job(dashboard: str, sub_id: str, *entry: str, env: dict) -> subprocess.CompletedProcess:
    cmd = [RAY_CLI, "job", "submit", "--address", dashboard,
           "--submission-id", sub_id, "--working-dir", str(REPO), "--", *entry]
    for _ in range(12):  # the job agent registers a few seconds after the node is up
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if "No available agent" not in res.stdout + res.stderr:
            return res
        time.sleep(5)
    return res


def _status(dashboard: str, sub_id: str, env: dict) -> str:
    """`ray job status` once the job has ended (it prints "Job '<id>' succeeded" / failed / stopped)."""
    deadline = time.time() + 300
    while True:
        res = subprocess.run([RAY_CLI, "job", "status", "--address", dashboard, sub_id],
                             capture_output=True, text=True, env=env, timeout=60)
        out = res.stdout + res.stderr
        if any(w in out for w in ("succeeded", "failed", "stopped", "does not exist")) or time.time() > deadline:
            return out
        time.sleep(2)


@pytest.mark.slow
def test_two_node_cluster_ray_job_submit(synth_small, tmp_path):
    env = dict(os.environ, RAY_AUTH_MODE="token", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    port = 8265 + os.getpid() % 500
    helper = subprocess.Popen([sys.executable, str(CLUSTER / "local_cluster.py"), "--dashboard-port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                              start_new_session=True)
    try:
        info = json.loads(helper.stdout.readline())
        dash = info["dashboard"]
        assert info["gcs_address"].startswith("127.0.0.1:")
        run, preds = tmp_path / "run", tmp_path / "preds"
        train = _job(dash, "hcd-train", "python", "jobs/train.py", "--data", str(synth_small), "--out", str(run),
                     "--epochs", "1", "--batch-size", "32", "--workers", "1", "--cpus-per-worker", "0.5", env=env)
        assert "Job 'hcd-train' succeeded" in _status(dash, "hcd-train", env), train.stderr[-3000:]
        assert (run / "model" / "model.safetensors").exists()
        score = _job(dash, "hcd-score", "python", "jobs/score.py", "--model", str(run / "model"),
                     "--input", str(synth_small), "--out", str(preds), "--chunk-size", "64", env=env)
        assert "Job 'hcd-score' succeeded" in _status(dash, "hcd-score", env), score.stderr[-3000:]
        from hcdlib.outputs.readers import read_predictions
        from hcdlib.outputs.runfolder import read_manifest

        assert read_manifest(str(preds))["rows"] == 300
        ids = read_predictions(str(preds))["id"].to_pylist()
        assert len(ids) == len(set(ids)) == 300
        # work ran on both nodes: the state API through the real CLI, with the cluster's token
        for _ in range(5):  # the state API can lag right after jobs end
            res = subprocess.run([RAY_CLI, "list", "tasks", "--address", dash, "--format", "json", "--detail",
                                  "--limit", "10000"], capture_output=True, text=True, env=env, timeout=120)
            if res.returncode == 0:
                break
            time.sleep(3)
        assert res.returncode == 0, res.stderr[-2000:]
        nodes = {t.get("node_id") for t in json.loads(res.stdout)}
        assert {info["head_node_id"], info["worker_node_id"]} <= nodes
        # a relative --out would land in Ray's temporary copy of --working-dir: refused, naming it
        rel = _job(dash, "hcd-relative", "python", "jobs/score.py", "--model", str(run / "model"),
                   "--input", str(synth_small), "--out", "preds", env=env)
        assert "Job 'hcd-relative' failed" in _status(dash, "hcd-relative", env)
        assert re.search(r"--out preds: a relative path in a Ray job lies in the job's working directory, Ray's "
                         r"temporary copy of --working-dir \(\S+/runtime_resources/", rel.stdout + rel.stderr)
        # a submission without the cluster's token is refused
        bad = _job(dash, "hcd-intruder", "echo", "hi", env=dict(env, RAY_AUTH_TOKEN="not-the-token"))
        assert bad.returncode != 0 and "token" in (bad.stdout + bad.stderr).lower()
        assert "succeeded" not in _status(dash, "hcd-intruder", env)
    finally:
        os.killpg(helper.pid, signal.SIGTERM)
        helper.wait(60)


@pytest.fixture()
def two_nodes():
    """The loopback two-node cluster of cluster/local_cluster.py; yields its address info."""
    env = dict(os.environ, RAY_AUTH_MODE="token", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    port = 8265 + (os.getpid() + 250) % 500
    helper = subprocess.Popen([sys.executable, str(CLUSTER / "local_cluster.py"), "--dashboard-port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                              start_new_session=True)
    try:
        yield dict(json.loads(helper.stdout.readline()), env=env)
    finally:
        os.killpg(helper.pid, signal.SIGTERM)
        helper.wait(60)


@pytest.mark.slow
def test_worker_node_killed_mid_score_is_finished_or_resumed_exactly_once(two_nodes, model_dir, tmp_path):
    from hcdlib.commands.synth import SynthConfig, write_synth
    from hcdlib.outputs.readers import read_predictions

    data, out = tmp_path / "data", tmp_path / "preds"
    write_synth(SynthConfig(out=str(data), n=1200, seed=5), processes=1)
    env = dict(two_nodes["env"], RAY_ADDRESS=two_nodes["gcs_address"])
    cmd = [sys.executable, str(REPO / "jobs" / "score.py"), "--model", str(model_dir), "--input", str(data),
           "--out", str(out), "--chunk-size", "64", "--tta", "8", "--batch-size", "32"]
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and driver.poll() is None and len(list(out.glob("parts/*.parquet"))) < 2:
        time.sleep(0.1)
    assert driver.poll() is None, "the run ended before the node could be killed"
    os.kill(two_nodes["worker_raylet_pid"], signal.SIGKILL)  # the worker node dies mid-run
    try:
        driver.wait(120)  # it may finish on the head node alone ...
    except subprocess.TimeoutExpired:
        driver.kill()  # ... or wait for the lost node's resources: stopped, to be resumed
        driver.wait(30)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("parts/*.parquet")}
    if driver.returncode != 0 or not (out / "_SUCCESS").exists():
        rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        after = {p.name: p.stat().st_mtime_ns for p in out.glob("parts/*.parquet")}
        assert all(after[n] == t for n, t in before.items())  # work done before the fault was kept
    ids = read_predictions(str(out))["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 1200
