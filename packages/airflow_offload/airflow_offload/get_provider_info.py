"""Provider metadata, read by Airflow's ProvidersManager through the ``apache_airflow_provider`` entry point.

Kept free of imports so that Airflow can read it without loading the provider."""


def get_provider_info() -> dict:
    return {
        "package-name": "offload",
        "name": "offload",
        "description": "Run Airflow tasks as containerised SLURM jobs on remote HPC sites, over one SSH connection.",
        "integrations": [
            {
                "integration-name": "offload",
                "external-doc-url": "https://github.com/offload-hpc/offload",
                "tags": ["software"],
            }
        ],
        "hooks": [{"integration-name": "offload", "python-modules": ["airflow_offload.hooks.offload"]}],
        "operators": [{"integration-name": "offload", "python-modules": ["airflow_offload.operators.offload"]}],
        "triggers": [{"integration-name": "offload", "python-modules": ["airflow_offload.triggers.offload"]}],
        "connection-types": [
            {
                "connection-type": "offload",
                "hook-class-name": "airflow_offload.hooks.offload.OffloadHook",
                "hook-name": "offload (HPC site over SSH)",
                "conn-fields": {
                    "site": {
                        "label": "Site profile",
                        "description": "A site of the offload config file; the fields below then override it",
                        "schema": {"type": ["string", "null"]},
                    },
                    "private_key": {
                        "label": "Private key (OpenSSH format)",
                        "schema": {"type": ["string", "null"], "format": "password"},
                    },
                    "key_file": {"label": "Private key file", "schema": {"type": ["string", "null"]}},
                    "host_key": {
                        "label": "Host key (e.g. 'ssh-ed25519 AAAA...')",
                        "description": "The site's public host key; connections to any other key are refused",
                        "schema": {"type": ["string", "null"]},
                    },
                    "scheduler": {"label": "Scheduler", "schema": {"type": ["string", "null"], "default": "slurm"}},
                    "runtime": {"label": "Container runtime", "schema": {"type": ["string", "null"]}},
                    "image": {"label": "Default image", "schema": {"type": ["string", "null"]}},
                    "partition": {"label": "Partition", "schema": {"type": ["string", "null"]}},
                    "gpu_partition": {"label": "GPU partition", "schema": {"type": ["string", "null"]}},
                    "account": {"label": "Account", "schema": {"type": ["string", "null"]}},
                    "gpus_per_node": {"label": "GPUs per node", "schema": {"type": ["integer", "null"]}},
                    "workdir": {"label": "Remote work dir", "schema": {"type": ["string", "null"]}},
                },
                "ui-field-behaviour": {
                    "hidden-fields": ["schema"],
                    "relabeling": {"host": "Login node", "login": "User"},
                    "placeholders": {"host": "login.leonardo.cineca.it", "port": "22", "extra": '{"setup": []}'},
                },
            }
        ],
        "task-decorators": [{"class-name": "airflow_offload.decorators.offload.offload_task", "name": "offload"}],
    }
