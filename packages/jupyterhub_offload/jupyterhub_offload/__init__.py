"""jupyterhub_offload: a JupyterHub spawner whose single-user servers are offload jobs on HPC sites.

# jupyterhub_config.py
c.JupyterHub.spawner_class = "offload"
c.OffloadSpawner.site = "leonardo"
c.OffloadSpawner.profiles = [
    {"display_name": "1 GPU, 4 hours", "slug": "gpu1", "gpus": 1, "walltime": "04:00:00", "default": True},
    {"display_name": "CPU only", "slug": "cpu", "gpus": 0},
]
"""

try:
    import jupyterhub  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"jupyterhub_offload needs JupyterHub: pip install 'offload[hub]' ({exc})") from None

from jupyterhub_offload.spawner import OffloadSpawner

__all__ = ["OffloadSpawner"]
