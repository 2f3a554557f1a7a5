"""Connecting to Ray: the cluster in RAY_ADDRESS, or a local instance started on demand."""

from __future__ import annotations

import os


def init_ray(metrics_export_port: int | None = None) -> None:
    """Connect to the cluster in RAY_ADDRESS, or start a local Ray instance (whose metrics
    agent serves Prometheus text on `metrics_export_port`, if given)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True,
                 _metrics_export_port=metrics_export_port)
