"""offload: run containerised work as SLURM jobs on remote HPC sites, over one SSH connection.

import offload
site = offload.load_site("leonardo")          # or None: $OFFLOAD_SITE, the default, else "local"
job = site.submit(offload.JobSpec(["python3", "train.py"], image="docker://me/train:1",
                                  resources=offload.Resources(gpus=4, walltime="02:00:00")))
for line in job.logs(follow=True):
    print(line)
"""

from offload.config import SiteConfig
from offload.doctor import run_checks
from offload.errors import (
    ConfigError,
    HostKeyError,
    ImageError,
    JobFailedError,
    JobNotFoundError,
    OffloadError,
    PluginError,
    RemoteCommandError,
    SiteNotAnswering,
    SubmissionError,
    TransportError,
)
from offload.executor import Executor, JobFuture, remote
from offload.hookspecs import RuntimePlugin, SchedulerPlugin, TransportPlugin, hookimpl
from offload.images import CachedImage, Images
from offload.jobs import EndCause, Job, JobState, JobStatus
from offload.jupyter import jupyter_spec
from offload.placement import (
    SiteGroup,
    Verdict,
    achoose_site,
    aresume_placement,
    choose_site,
    load_sites,
    resume_placement,
)
from offload.profiles import SiteProfiles, load_profiles, profile_from_table
from offload.race import Placement
from offload.retry import Retry, RetryPolicy
from offload.runtimes.base import ContainerCommand, Runtime
from offload.schedulers.base import NodeResources, Scheduler
from offload.script import BatchScript
from offload.site import Forward, Site, load_site, shared_site
from offload.sizes import format_size, parse_size
from offload.spec import ENV_NAME, JobSpec, Mount, Resources, archive

__version__ = "0.1.0"

__all__ = [
    "ENV_NAME",
    "BatchScript",
    "CachedImage",
    "ConfigError",
    "ContainerCommand",
    "EndCause",
    "Executor",
    "Forward",
    "HostKeyError",
    "ImageError",
    "Images",
    "Job",
    "JobFailedError",
    "JobFuture",
    "JobNotFoundError",
    "JobSpec",
    "JobState",
    "JobStatus",
    "Mount",
    "NodeResources",
    "OffloadError",
    "Placement",
    "PluginError",
    "RemoteCommandError",
    "Resources",
    "Retry",
    "RetryPolicy",
    "Runtime",
    "RuntimePlugin",
    "Scheduler",
    "SchedulerPlugin",
    "Site",
    "SiteConfig",
    "SiteGroup",
    "SiteNotAnswering",
    "SiteProfiles",
    "SubmissionError",
    "TransportError",
    "TransportPlugin",
    "Verdict",
    "achoose_site",
    "archive",
    "aresume_placement",
    "choose_site",
    "format_size",
    "hookimpl",
    "jupyter_spec",
    "load_profiles",
    "load_site",
    "load_sites",
    "parse_size",
    "profile_from_table",
    "remote",
    "resume_placement",
    "run_checks",
    "shared_site",
]
