"""Connecting to Ray: the cluster in RAY_ADDRESS, or a local instance started on demand."""

from __future__ import annotations

import os


def init_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS, or start a local Ray instance."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True)
