"""jupyterhub_offload: a JupyterHub spawner whose single-user servers are offload jobs on HPC sites.

# jupyterhub_config.py
c.JupyterHub.spawner_class = "offload"
c.OffloadSpawner.site = "leonardo"
c.OffloadSpawner.profiles = [
    {"display_name": "1 GPU, 4 hours", "slug": "gpu1", "gpus": 1, "walltime": "04:00:00", "default": True},
    {"display_name": "CPU only", "slug": "cpu", "gpus": 0},
]
"""

from jupyterhub_offload.spawner import OffloadSpawner

__all__ = ["OffloadSpawner"]
