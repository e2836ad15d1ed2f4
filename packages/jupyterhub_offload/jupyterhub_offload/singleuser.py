"""Runs in the job: the hub's single-user command, as the server command of offload's Jupyter launcher.

This file is sent as a ``python3 -c`` program (the spawner ships its source), so it may import only the standard
library, and must run on the image's Python (3.6 or later). offload's launcher (``offload.jupyter_spec``) has
already given the server job-private Jupyter directories, a free port on the node's loopback (reported to the
spawner in ``jupyter.json``) and its root directory; it runs this program with its options appended:

    python3 -c SOURCE '[CMD, ARGS]' --ip=127.0.0.1 --port=PORT ... --ServerApp.root_dir=ROOT ...

CMD and ARGS are the hub's ``Spawner.cmd`` (``null``: ``jupyterhub-singleuser``, run as this Python's
``-m jupyterhub.singleuser``, found without the image's PATH) and ``Spawner.get_args()``, as JSON, one argument.
It tells the server its URL, which the hub could not know (the port is the launcher's, in
``OFFLOAD_JUPYTER_PORT``; the prefix the hub's ``JUPYTERHUB_SERVICE_PREFIX``), then execs ``CMD OPTIONS ARGS``:
the hub's args last, so that they win; every part one argument, as written.
"""

import json
import os
import sys


def server_argv(cmd, args, options, python):
    """The single-user server's command line: the hub's command, the launcher's options, the hub's args."""
    return list(cmd or [python, "-m", "jupyterhub.singleuser"]) + list(options) + list(args)


def service_url(port, prefix):
    """``JUPYTERHUB_SERVICE_URL``: where the server listens (the node's loopback, the launcher's port), with the
    prefix the hub routes to it."""
    return f"http://127.0.0.1:{port}{prefix}"


def main(argv):
    cmd, args = json.loads(argv[1])
    port = os.environ["OFFLOAD_JUPYTER_PORT"]
    os.environ["JUPYTERHUB_SERVICE_URL"] = service_url(port, os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/"))
    server = server_argv(cmd, args, argv[2:], sys.executable)
    os.execvp(server[0], server)


if __name__ == "__main__":
    main(sys.argv)
