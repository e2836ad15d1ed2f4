"""Schedulers: render directives, submit, poll and cancel. ``slurm`` for HPC sites, ``local`` for this machine."""
