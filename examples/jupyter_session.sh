#!/usr/bin/env bash
# User story 2: "Give me a JupyterLab on that GPU node".
#
#   examples/jupyter_session.sh                  # on this machine (the local site)
#   examples/jupyter_session.sh testsite 2       # on the test site's GPU partition, 2 GPUs, in its container
#
# Prints the URL (a 127.0.0.1 port forward over the site's SSH connection) and opens a browser unless
# NO_BROWSER=1; Ctrl-C ends the session and cancels the job. Add --detach to keep it, then
# 'offload jupyter --attach JOB' reconnects with the same token.
set -euo pipefail
site=${1:-local}
gpus=${2:-0}
exec offload jupyter --site "$site" --gpus "$gpus" --time 02:00:00 ${NO_BROWSER:+--no-browser}
