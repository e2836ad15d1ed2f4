"""Transports: how offload reaches a site. ``ssh`` (asyncssh) for remote sites, ``local`` for this machine."""
