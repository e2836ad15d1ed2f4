"""dask_offload: Dask clusters whose scheduler and workers are SLURM jobs in containers on a remote site.

from dask_offload import OffloadCluster
cluster = OffloadCluster(site="leonardo", gpus=4, image="docker://ghcr.io/me/analysis:1.2")
client = cluster.get_client()
"""

try:
    import dask  # noqa: F401
    import distributed  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"dask_offload needs Dask: pip install 'offload[dask]' ({exc})") from None

from dask_offload.cluster import OffloadCluster

__all__ = ["OffloadCluster"]
