"""A hub anywhere (a cloud VM, a laptop) whose sessions run as jobs on an HPC site's GPU nodes.

    pip install 'offload[hub]' && npm install -g configurable-http-proxy
    jupyterhub -f examples/jupyterhub_config.py

The hub reaches the site over SSH only (the site profile named below, see `offload sites list`); compute
nodes never connect to the hub: offload carries the single-user servers' hub API traffic (OAuth, activity for
the idle culler) back over its own connection. Replace the dummy authenticator with your own.
"""

import sys

c = get_config()  # noqa: F821 - JupyterHub's config loader defines it

c.JupyterHub.bind_url = "http://127.0.0.1:8000"
c.JupyterHub.authenticator_class = "dummy"  # for a try-out only: any password is accepted
c.Authenticator.allow_all = True
c.JupyterHub.allow_named_servers = True

c.JupyterHub.spawner_class = "offload"
c.OffloadSpawner.site = "testsite"  # an offload site profile
c.OffloadSpawner.walltime = "04:00:00"
# The hub's own Spawner settings hold: mem_limit and cpu_limit are a session's memory and cores unless its profile
# sets them; cmd and args (quoted for the job's shell), notebook_dir and default_url reach the server.
c.Spawner.mem_limit = "8G"
c.Spawner.default_url = "/lab"
# Site accounts: here every hub user is the profile's one account; a site with an account per person maps
# them, each with their own key (one SSH connection per account, shared by that account's sessions):
# c.OffloadSpawner.site_user = lambda spawner: spawner.user.name
# c.OffloadSpawner.ssh_identity = lambda spawner: f"/srv/hub/keys/{spawner.user.name}"
c.OffloadSpawner.profiles = [
    {"display_name": "1 GPU, 4 hours", "slug": "gpu1", "gpus": 1, "default": True},
    {
        "display_name": "2 GPUs, 8 hours",
        "slug": "gpu2",
        "gpus": 2,
        "walltime": "08:00:00",
        "description": "for training runs",
    },
    {
        "display_name": "CPU only",
        "slug": "cpu",
        "gpus": 0,
        "cpus": 4,
        "memory": "8G",
        # images the user may pick from (with jupyterhub and jupyterlab in them), e.g. one pushed with
        # `offload image push ./lab-rootfs --name my-lab-image`
        "images": ["/var/lib/offload-testsite/images/default", "my-lab-image"],
    },
    # A profile written for KubeSpawner works where its keys mean the same on a SLURM site (cpu_limit, mem_limit,
    # image, extra_resource_limits {"nvidia.com/gpu": N}); any other key is refused when the hub loads it:
    # {"display_name": "4 GPUs", "kubespawner_override": {"cpu_limit": 32, "mem_limit": "256G",
    #                                                    "extra_resource_limits": {"nvidia.com/gpu": "4"}}},
]
# profiles may also be a callable (async or not) taking the spawner, e.g. a list per group of the user.

# Idle HPC sessions are culled (their activity reaches the hub through offload), freeing the allocation.
c.JupyterHub.services = [
    {"name": "idle-culler", "command": [sys.executable, "-m", "jupyterhub_idle_culler", "--timeout=3600"]},
]
c.JupyterHub.load_roles = [
    {
        "name": "idle-culler",
        "services": ["idle-culler"],
        "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"],
    },
]
