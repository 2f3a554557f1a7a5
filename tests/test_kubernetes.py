"""The Kubernetes manifests (deploy/kubernetes/): valid against KubeRay v1.7's own CRD schemas with
no field those schemas do not know, commands that clfsys's parser accepts, a Serve config
generated from jobs/serve.yaml, the locked stack in the image, and no secret in any file.
(No Kubernetes cluster here: these are the checks that need none.)"""

from __future__ import annotations

import copy
import functools
import importlib.util
import re
import shlex

import pytest
import yaml
from conftest import ROOT

DEPLOY = ROOT / "deploy" / "kubernetes"
CRDS = ROOT.parent / "shared" / "kuberay"
MANIFESTS = ["tune-rayjob.yaml", "label-rayjob.yaml", "serve-rayservice.yaml"]


def manifest(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


@functools.cache
def crd_schema(kind: str) -> dict:
    path = CRDS / f"ray.io_{kind.lower()}s.yaml"
    if not path.exists():
        pytest.skip(f"{path} not found (KubeRay's CRDs are in ../shared/kuberay)")
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


def unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Paths in `value` that `schema` does not declare. The CRDs allow unknown fields (Kubernetes
    prunes them silently, so a misspelled key just vanishes); this walk refuses them."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(value, dict):
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if properties is not None and key in properties:
                found += unknown_fields(item, properties[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += unknown_fields(item, extra, f"{path}.{key}")
            elif properties is not None or extra is False:
                found.append(f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


@pytest.mark.parametrize("name", MANIFESTS)
def test_each_manifest_passes_kuberays_schema_with_no_unknown_field(name):
    import jsonschema

    doc = manifest(name)
    assert doc["apiVersion"] == "ray.io/v1"
    schema = crd_schema(doc["kind"])
    validator = jsonschema.Draft7Validator(schema)  # the CRD schema is OpenAPI v3, draft-7-like
    validator.validate(doc)
    assert unknown_fields(doc, schema) == []
    # The walk does catch a misspelled key that jsonschema lets through.
    spec = doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]
    misspelled = copy.deepcopy(doc)
    cluster = misspelled["spec"].get("rayClusterSpec") or misspelled["spec"]["rayClusterConfig"]
    cluster["workerGroupSpecs"][0]["maxReplica"] = 4
    validator.validate(misspelled)
    assert unknown_fields(misspelled, schema) == [
        f".spec.{'rayClusterSpec' if 'rayClusterSpec' in doc['spec'] else 'rayClusterConfig'}"
        ".workerGroupSpecs[0].maxReplica"]
    # Token authentication on, the token from a Secret; GPU workers from 0 or 1 up to 4.
    assert spec["authOptions"] == {"mode": "token", "secretName": "clfsys-ray-token"}
    assert spec["enableInTreeAutoscaling"] is True and spec["rayVersion"].startswith("2.60.")
    (gpu,) = spec["workerGroupSpecs"]
    (worker,) = gpu["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1" and gpu["maxReplicas"] >= 1
    assert worker["image"].endswith(":gpu")
    (head,) = spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert head["image"].endswith(":cpu") and "nvidia.com/gpu" not in head["resources"]["limits"]


@pytest.mark.parametrize("name", ["tune-rayjob.yaml", "label-rayjob.yaml"])
def test_each_jobs_entrypoint_is_a_clfsys_command_on_s3(name):
    from clfsys.cli import build_parser
    from clfsys.config import load_config

    words = shlex.split(manifest(name)["spec"]["entrypoint"])
    assert words[0] == "clfsys"
    args = build_parser().parse_args(words[1:])  # exits (SystemExit) on an unknown flag
    if args.command == "tune":
        assert args.config.startswith("/home/ray/clfsys/")  # where the image puts jobs/
        cfg = load_config(ROOT / args.config.removeprefix("/home/ray/clfsys/"),
                          args.overrides)
        assert cfg.tune.storage_path.startswith("s3://") and args.out.startswith("s3://")
        assert cfg.tune.resources.gpu == 0.5
    else:
        assert args.model.startswith("s3://") and args.output.startswith("s3://")
        assert all(i.startswith("s3://") for i in args.input)
        assert args.resume  # a retry (backoffLimit) labels what is missing, each file once


def render_module():
    spec = importlib.util.spec_from_file_location("render", DEPLOY / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_rayservice_serve_config_is_generated_from_jobs_serve_yaml():
    from ray.serve.schema import ServeDeploySchema

    from clfsys.errors import ClfsysError
    from clfsys.serve import app_args

    render = render_module()
    text = (DEPLOY / "serve-rayservice.yaml").read_text()
    assert render.render() == text  # never edited by hand: `render.py --write` made it
    config = yaml.safe_load(manifest("serve-rayservice.yaml")["spec"]["serveConfigV2"])
    served = yaml.safe_load((ROOT / "jobs" / "serve.yaml").read_text())
    assert config == served
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "clfsys.serve:app_builder"
    model, options = app_args(app["args"])
    assert model.startswith("s3://") and options.auth_token_env == "CLFSYS_TOKEN"
    # An upgrade changes the bundle's URI and nothing else.
    upgraded = yaml.safe_load(render.render("s3://b/clfsys/search-2/best"))
    new = yaml.safe_load(upgraded["spec"]["serveConfigV2"])
    assert new["applications"][0]["args"].pop("model") == "s3://b/clfsys/search-2/best"
    app["args"].pop("model")
    assert new == config
    assert {k: v for k, v in upgraded["spec"].items() if k != "serveConfigV2"} == {
        k: v for k, v in manifest("serve-rayservice.yaml")["spec"].items()
        if k != "serveConfigV2"}
    # app_builder's own parser refuses what it would refuse at deploy time; `serve run ...
    # key=value` strings are typed from ServeOptions' fields, with no list of exceptions.
    with pytest.raises(ClfsysError, match="unknown serve option 'max_replica'"):
        app_args({"model": "s3://b/m", "max_replica": 4})
    with pytest.raises(ClfsysError, match="serve option max_batch_size: 'many' is not an int"):
        app_args({"model": "s3://b/m", "max_batch_size": "many"})
    _, typed = app_args({"model": "s3://b/m", "max_batch_size": "16", "access_log": "true",
                         "max_replicas_per_node": "none", "host": "0.0.0.0", "name": "1",
                         "batch_wait_ms": "2.5"})
    assert (typed.max_batch_size, typed.access_log, typed.max_replicas_per_node, typed.host,
            typed.name, typed.batch_wait_ms) == (16, True, None, "0.0.0.0", "1", 2.5)
    # The ingress is HAProxy, as on cluster.yaml's nodes, and readiness is /healthz.
    spec = manifest("serve-rayservice.yaml")["spec"]["rayClusterConfig"]
    containers = [spec["headGroupSpec"]["template"]["spec"]["containers"][0],
                  spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]]
    for container in containers:
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and "CLFSYS_TOKEN" in env
    assert containers[1]["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": 8000}


def test_the_image_installs_the_locked_stack():
    text = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE=(\S+)$", text, re.M).group(1)
    lock = re.search(r"^ARG LOCK=(\S+)$", text, re.M).group(1)
    ray = re.search(r"^ray==(\S+)", (ROOT / "locks" / "base.txt").read_text(), re.M).group(1)
    assert base == f"rayproject/ray:{ray}-py311"  # the locks are compiled for Python 3.11
    assert lock == "base.txt" and "LOCK=gpu.txt" in text and f"ray:{ray}-py311-gpu" in text
    assert re.search(r"^RUN pip install --no-cache-dir -r \S+/locks/\$\{LOCK\}$", text, re.M)
    assert re.search(r"^RUN pip install --no-cache-dir --no-deps \S+$", text, re.M)
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())  # the same files as the VMs
    assert "locks/base.txt" in " ".join(cluster["head_setup_commands"])
    assert "locks/gpu.txt" in " ".join(cluster["worker_setup_commands"])


SECRETS = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.I)


def env_entries(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list):
                yield from value
            else:
                yield from env_entries(value)
    elif isinstance(node, list):
        for item in node:
            yield from env_entries(item)


@pytest.mark.parametrize("name", MANIFESTS)
def test_no_manifest_holds_a_secret(name):
    text = (DEPLOY / name).read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key\s*=", text)
    entries = list(env_entries(manifest(name)))
    secret = [e for e in entries if SECRETS.search(e["name"])]
    assert {e["name"] for e in secret} >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for entry in secret:  # from a Secret, never a literal
        assert "value" not in entry and entry["valueFrom"]["secretKeyRef"]["name"], entry
