"""``offload interlink``: the plugin's own sub-command of the ``offload`` CLI.

The core CLI knows no adapter: it takes this group through the entry point group ``offload.cli``
(``interlink = "interlink_offload.cli:interlink"`` in pyproject.toml) and imports this module only when
``offload interlink ...`` runs. Importing it imports the package, whose ``__init__`` says which extra to install
when aiohttp is missing; this module itself imports neither aiohttp nor the server until ``serve`` runs.
"""

from __future__ import annotations

import click

from offload import ConfigError, load_site
from offload.cli_common import SITE_HELP, log_to_stderr, user_errors


@click.group()
def interlink() -> None:
    """offload as an interLink plugin: Kubernetes pods run as jobs on a site."""


@interlink.command("serve")
@click.option("--site", "site_name", help=SITE_HELP)
@click.option("--listen", default="127.0.0.1:4000", show_default=True,
              help="HOST:PORT or unix:///path.sock: what interLink's SidecarURL/SidecarPort point at.")  # fmt: skip
@click.option("--image-map", "image_map", multiple=True, metavar="IMAGE=REF",
              help="Run the pods' IMAGE as REF (a pin, a pushed image's name, a site path); repeatable.")  # fmt: skip
@click.option("--public", is_flag=True, help="Allow a non-loopback --listen (interLink sends no credentials).")
@click.option("--public-name", "public_names", multiple=True, metavar="NAME",
              help="A host name interLink reaches the plugin by (checked in Host); repeatable.")  # fmt: skip
@click.option("--token-file", type=click.Path(dir_okay=False),
              help="Require 'Authorization: Bearer <token>' (the file's content) on every request.")  # fmt: skip
def serve(site_name: str | None, listen: str, image_map: tuple[str, ...], public: bool,
          public_names: tuple[str, ...], token_file: str | None) -> None:  # fmt: skip
    """Serve interLink's plugin API: /create, /status, /getLogs, /delete. Stopping it leaves the pods' jobs
    running; started again, it answers for them."""
    import asyncio

    from interlink_offload.server import serve as serve_pods

    log_to_stderr("interlink_offload", "offload interlink")
    with user_errors():
        mapping = {}
        for item in image_map:
            pod_image, sep, ref = item.partition("=")
            if not (sep and pod_image and ref):
                raise ConfigError(f"--image-map {item!r}: give IMAGE=REF, e.g. python:3.11=/site/images/python.sqfs")
            mapping[pod_image] = ref
        asyncio.run(serve_pods(load_site(site_name), listen, image_map=mapping, public=public,
                               hosts=public_names, token_file=token_file))  # fmt: skip
