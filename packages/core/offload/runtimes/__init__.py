"""Container runtimes: how a job's command is wrapped to run inside its image."""
