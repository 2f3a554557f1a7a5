"""`clfsys serve`: deploy one named application (serve.build_app) and run until Ctrl-C or
SIGTERM; then drain, delete only that application and stop what this command started (a local
Ray instance, HAProxy). Run against a cluster (RAY_ADDRESS) where the name is already serving,
it rolls the new bundle out in place of the old one and exits."""

import os
import shutil
import signal
import sys
import time
from dataclasses import asdict
from typing import Any

from clfsys.errors import ClfsysError, IncompleteError
from clfsys.serve import DEPLOYMENT, ServeOptions, build_app, read_auth_token


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _serving_model(name: str) -> str | None:
    """The model_id that application `name` serves now, or None if it is not running."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        status = serve.status().applications.get(name)
    except RayServeException:  # no Serve instance on this cluster yet
        return None
    if status is None or status.status not in ("RUNNING", "DEPLOYING"):
        return None
    if DEPLOYMENT not in status.deployments:
        raise ClfsysError(f"application {name!r} on this cluster is not a clfsys model; "
                          "choose another --name")
    return serve.get_app_handle(name).model_info.remote().result()["model_id"]


def swap_model(model: str, options: ServeOptions, app, model_id: str) -> dict[str, Any]:
    """Roll `app` out under a running name: Serve replaces the replicas one by one, each new
    one warm before an old one drains, so requests keep being answered."""
    from ray import serve

    previous = _serving_model(options.name)
    started = time.monotonic()
    _log(f"application {options.name!r} serves {previous}; rolling out {model_id} from {model}")
    serve.run(app, name=options.name, route_prefix=options.route_prefix)
    now = _serving_model(options.name)
    result = {"application": options.name, "swapped": True, "previous_model_id": previous,
              "model_id": now, "rollout_s": round(time.monotonic() - started, 1)}
    if now != model_id:
        raise IncompleteError(f"application {options.name!r} serves {now}, not {model_id}",
                              result)
    return result


def run_server(model: str, options: ServeOptions) -> dict[str, Any]:
    """`clfsys serve`: deploy the application and block until Ctrl-C or SIGTERM; then drain,
    delete this application only, and stop the local Ray instance and HAProxy if this command
    started them. On a cluster where `options.name` already serves, swap the model and return."""
    import ray

    from clfsys import ingress
    from clfsys.bundle import load
    from clfsys.cluster import init_ray

    token = read_auth_token(options.auth_token_env)
    app = build_app(model, options, token=token)
    model_id = load(model).model_id
    url = f"http://{options.host}:{options.port}{options.route_prefix.rstrip('/')}"
    on_cluster = bool(os.environ.get("RAY_ADDRESS"))
    run_dir = ingress.make_run_dir()
    try:
        if on_cluster:
            init_ray()
            if _serving_model(options.name) is not None:
                return {**swap_model(model, options, app, model_id), "url": url}
        else:
            os.environ["RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S"] = str(
                int(options.request_timeout_s) + 1)
            if not ingress.port_is_free(options.metrics_port):
                raise ClfsysError(f"--metrics-port {options.metrics_port} is in use; choose "
                                  "another port for this Ray instance's metrics")
            ingress.configure_local(options.ingress, options.host, run_dir)
            init_ray(metrics_export_port=options.metrics_port)
        return _serve_until_stopped(model, options, app, url, on_cluster)
    finally:
        if not on_cluster:
            ray.shutdown()
            leftover = ingress.stop_haproxy(run_dir)
            if leftover:
                _log(f"stopped {len(leftover)} HAProxy process(es) that outlived Serve")
        shutil.rmtree(run_dir, ignore_errors=True)


def _serve_until_stopped(model: str, options: ServeOptions, app, url: str,
                         on_cluster: bool) -> dict[str, Any]:
    import ray
    from ray import serve

    from clfsys import ingress

    started = time.monotonic()

    def stop(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    # SIGTERM: systemd, Kubernetes, docker stop. SIGINT explicitly too: a process started in
    # the background of a shell inherits SIGINT ignored, and Ctrl-C must still stop it.
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    deployed, stopped_by = False, None
    try:
        serve.start(http_options={"host": options.host, "port": options.port,
                                  "request_timeout_s": options.request_timeout_s})
        serve.run(app, name=options.name, route_prefix=options.route_prefix)
        deployed = True
        front = ingress.running_ingress() or "none"
        address = os.environ.get("RAY_ADDRESS") or ray.get_runtime_context().gcs_address
        where = f"cluster {address}" if on_cluster else f"Ray at {address}"
        metrics = ("" if on_cluster else
                   f"; metrics at http://{options.host}:{options.metrics_port}/metrics")
        _log(f"serving {model} as {options.name!r} at {url} via the {front} ingress ({where}"
             f"{metrics}): POST {url}/predict, V2 at {url}/v2, TF Serving at {url}/v1, docs at "
             f"{url}/docs; auth {'on' if options.auth_token_env else 'off'}. Ctrl-C to stop")
        nodes = [n for n in ray.nodes() if n["Alive"]]
        if front == ingress.HAPROXY and options.host in ingress.LOOPBACK and len(nodes) > 1:
            _log(f"warning: --host {options.host} on a {len(nodes)}-node cluster: replicas "
                 "listen on loopback, where HAProxy on another node cannot reach them; pass "
                 "--host 0.0.0.0 (and firewall the port) when Serve first starts there")
        _log(f"to swap the model without downtime: RAY_ADDRESS={address} RAY_AUTH_MODE=token "
             f"clfsys serve --name {options.name} --model NEW_BUNDLE")
        while True:
            time.sleep(1)
    except KeyboardInterrupt as exc:
        stopped_by = str(exc) or "SIGINT"
        _log(f"{stopped_by}: shutting down {options.name!r}, finishing in-flight requests")
    finally:
        # A second Ctrl-C or SIGTERM must not cut the drain short.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        try:
            serve.delete(options.name)
            if not on_cluster:
                serve.shutdown()  # stops the proxies (and HAProxy) of the local instance
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return {"served_s": round(time.monotonic() - started, 1), "url": url,
            "application": options.name, "deployed": deployed, "stopped_by": stopped_by,
            "options": asdict(options)}
