"""offload as an interLink plugin: the pods a Kubernetes Virtual Kubelet hands to interLink run as
containerised jobs on an offload site, over offload's one SSH connection.

    offload interlink serve --site leonardo --listen 127.0.0.1:4000

and point interLink's ``SidecarURL``/``SidecarPort`` at it. From Python::

    import asyncio, offload, interlink_offload
    asyncio.run(interlink_offload.serve(offload.load_site("leonardo"), "127.0.0.1:4000"))
"""

try:
    import aiohttp  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"interlink_offload needs aiohttp: pip install 'offload[interlink]' ({exc})") from None

from interlink_offload.pods import plan_pod
from interlink_offload.server import PodServer, serve, site_image

__all__ = ["PodServer", "plan_pod", "serve", "site_image"]
