"""``OffloadOperator``: run a container as a SLURM job on an HPC site, sync or deferrable.

A task instance's job has a deterministic name (dag, task, run, map index), so when a worker dies while its
job queues or runs, the retry finds that job on the site and **reattaches** instead of submitting the work
twice. A job that already ended is not reused: a retry or a cleared task runs the work again. Because the
name is on the site itself, this needs no state written between submitting and polling (the gap Airflow's
``ResumableJobMixin`` documents) and works from any worker.

Deferred, the task waits in the triggerer: submitted by one process, watched by another (which brings the
job's output into the task log as it comes), finished by a third, which logs only what was left.

With several sites and ``policy="race"``, the task submits one attempt of its job to each of the ``width`` best
sites; whichever starts first is claimed and runs the payload, once, and the others are released and cancelled
(``offload.Placement``). Deferred, the triggerer claims: the worker hands it the attempts, never the secrets. A
retry whose worker died finds the earlier try's attempts by their name on each site, as above, and finishes
that placement instead of starting another.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
from collections.abc import Container, Mapping, Sequence
from datetime import timedelta
from typing import Any, Literal

import offload
from airflow_offload.hooks.offload import OffloadHook
from airflow_offload.triggers.offload import OffloadJobTrigger, deferral
from airflow_offload.version_compat import (
    AirflowException,
    AirflowSkipException,
    BaseOperator,
    TaskDeferralError,
    TaskDeferralTimeout,
    conf,
    mask_secret,
)

_RESOURCES = ("gpus", "gpus_per_node", "nodes", "tasks_per_node", "cpus", "memory", "walltime", "partition",
              "account", "qos")  # fmt: skip
_WHOLE = ("gpus", "gpus_per_node", "nodes", "tasks_per_node", "cpus")
_CLEANUP = ("never", "on_success", "always")
# A deferred race is claimed by a trigger, which may run more than once and must never submit: only the policies
# that submit every attempt at the start are offered.
_POLICIES = ("first-fit", "race")


class OffloadOperator(BaseOperator):
    """Run ``command`` in ``image`` on an HPC site as a SLURM job; its output streams into the task log.

    :param command: the argv to run (templated), e.g. ``["python3", "train.py", "--date", "{{ ds }}"]``
    :param image: container image (templated; default: the site's)
    :param gpus, gpus_per_node, nodes, tasks_per_node, cpus, memory, walltime, partition, account, qos: what the
        job asks for (all templated: ``gpus="{{ params.gpus }}"`` works)
    :param env: environment for the payload (templated)
    :param secrets: environment the payload gets as secrets (templated, e.g. ``"{{ conn.wandb.password }}"``):
        masked in the task log, never written into a script; Airflow's rendered view hides them
    :param reach: services on the worker's side the job reaches through offload's connection, ``{NAME: URL}``
    :param mounts: ``"SRC[:DST[:ro]]"`` site paths to bind into the container (templated)
    :param site: an offload site profile; ``offload_conn_id``: an Airflow connection of type ``offload`` or
        ``ssh`` (with ``site``: that profile, with the connection's credentials)
    :param deferrable: wait in the triggerer, freeing the worker slot while the job queues and runs (default:
        Airflow's ``[operators] default_deferrable``, as for Airflow's own providers)
    :param poll_interval: seconds between looks at the job's state and output (default: the site's)
    :param skip_on_exit_code: exit code(s) that mark the task skipped instead of failed (like BashOperator's)
    :param cancel_on_failure: when the task fails while its job lives (the site stops answering, the deferral
        times out), cancel the job (default) or leave it running, saying so in the log
    :param reattach_on_restart: when a retry finds the job of an earlier try still queued or running (its worker
        died), take it over (default, like the Kubernetes operator's pods); ``False`` cancels that job and
        submits a new one, so each try runs the work itself
    :param policy: with several sites (``site="a,b"`` or ``"@group"``): ``"first-fit"`` (default) submits the job
        once, to the site where it starts first; ``"race"`` submits an attempt to each of the ``width`` best
        sites, and the first to start runs the job, exactly once, the others being cancelled before their
        payload could run. Offload's ``failover`` and ``estimate`` policies submit later attempts as earlier
        ones fail, which a trigger (it may run twice) must not do: race over the sites you would fail over to.
    :param width: with ``policy="race"``: how many sites get an attempt (default 2, the best by free
        resources, then by their schedulers' plans)
    :param cleanup: when to remove the job's directory on the site once the job has ended: ``"never"``
        (default: its output and files stay for ``offload logs``/``offload get``), ``"on_success"`` (the task
        succeeded) or ``"always"``, as the SSH provider's ``SSHRemoteJobOperator`` offers; sites count inodes,
        and a DAG that runs often leaves a directory per task instance

    XCom, with ``do_xcom_push`` (BaseOperator's flag, on by default): the return value is the last line of the
    job's output (like BashOperator); ``job_id``, ``state`` and ``exit_code`` are pushed under those keys.
    Without it nothing is pushed and no result is read. A job that does not complete fails the task with the
    tail of its log. A deferral times out with the task's ``execution_timeout``.
    """

    template_fields: Sequence[str] = ("command", "image", "env", "secrets", "mounts", "workdir", "job_name",
                                      *_RESOURCES)  # fmt: skip
    template_fields_renderers = {"command": "py", "env": "json"}
    ui_color = "#c6e2ff"

    def __init__(
        self,
        *,
        command: Sequence[str],
        image: str | None = None,
        gpus: int | str = 0,
        gpus_per_node: int | str | None = None,
        nodes: int | str = 1,
        tasks_per_node: int | str | None = None,
        cpus: int | str | None = None,
        memory: str | None = None,
        walltime: str | None = None,
        partition: str | None = None,
        account: str | None = None,
        qos: str | None = None,
        env: Mapping[str, str] | None = None,
        secrets: Mapping[str, str] | None = None,
        reach: Mapping[str, str] | None = None,
        mounts: Sequence[str] | None = None,
        workdir: str | None = None,
        site: str | None = None,
        offload_conn_id: str | None = None,
        job_name: str | None = None,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        poll_interval: float | None = None,
        log_tail_lines: int = 20,
        skip_on_exit_code: int | Container[int] | None = None,
        cancel_on_failure: bool = True,
        reattach_on_restart: bool = True,
        cleanup: Literal["never", "on_success", "always"] = "never",
        policy: Literal["first-fit", "race"] = "first-fit",
        width: int = 2,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if cleanup not in _CLEANUP:
            raise ValueError(f"{self.task_id}: cleanup={cleanup!r}: use one of {', '.join(map(repr, _CLEANUP))}")
        if policy not in _POLICIES:
            more = (" (they submit a later attempt when one fails, which a trigger must not do: race over those "
                    "sites instead)") if policy in ("failover", "estimate") else ""  # fmt: skip
            raise ValueError(f"{self.task_id}: policy={policy!r}: use one of {', '.join(map(repr, _POLICIES))}{more}")
        if policy == "race" and (offload_conn_id is not None or not site):
            raise ValueError(f"{self.task_id}: policy='race' places the job over several site profiles "
                             "(site='a,b' or '@group'); a connection is one site")  # fmt: skip
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"{self.task_id}: width={width!r}: how many sites get an attempt, at least 1")
        self.command = command
        self.image = image
        self.gpus, self.gpus_per_node, self.nodes, self.tasks_per_node = gpus, gpus_per_node, nodes, tasks_per_node
        self.cpus, self.memory, self.walltime = cpus, memory, walltime
        self.partition, self.account, self.qos = partition, account, qos
        self.env = dict(env or {})
        self.secrets = dict(secrets or {})
        self.reach = dict(reach or {})
        self.mounts = list(mounts or [])
        self.workdir = workdir
        self.site = site
        self.offload_conn_id = offload_conn_id
        self.job_name = job_name
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.log_tail_lines = log_tail_lines
        self.skip_on_exit_code = (
            [skip_on_exit_code] if isinstance(skip_on_exit_code, int) else list(skip_on_exit_code or [])
        )
        self.cancel_on_failure = cancel_on_failure
        self.reattach_on_restart = reattach_on_restart
        self.cleanup = cleanup
        self.policy = policy
        self.width = width
        self._job: offload.Job | None = None
        self._placement: offload.Placement | None = None
        self.result_key: str | None = None  # set by @task.offload: the key its job signs the result with
        if not any(_templated(getattr(self, name)) for name in _RESOURCES):
            self.job_resources()  # bad values fail when the DAG is parsed, not when the task runs

    # -- what to run ------------------------------------------------------------------------------------

    @property
    def hook(self) -> OffloadHook:
        return OffloadHook(offload_conn_id=self.offload_conn_id, site=self.site)

    def job_resources(self) -> offload.Resources:
        """What the job asks for, from the (rendered) fields; whole numbers may arrive as template strings."""
        values: dict[str, Any] = {name: getattr(self, name) for name in _RESOURCES}
        for name in _WHOLE:
            value = values[name]
            if isinstance(value, str):
                try:
                    values[name] = int(value.strip())
                except ValueError:
                    raise offload.ConfigError(f"{self.task_id}: {name}={value!r} is not a whole number") from None
        return offload.Resources(**values)

    def job_files(self, context: Any) -> dict[str, bytes]:
        """Files staged into the job's directory with the submission (the TaskFlow decorator's input)."""
        return {}

    def build_spec(self, context: Any) -> offload.JobSpec:
        command = [self.command] if isinstance(self.command, str) else list(self.command)
        return offload.JobSpec(
            command=[str(a) for a in command], image=self.image, resources=self.job_resources(),
            env={k: str(v) for k, v in self.env.items()}, secrets={k: str(v) for k, v in self.secrets.items()},
            reach=dict(self.reach), mounts=self.mounts, workdir=self.workdir,
            name=self.job_name or deterministic_name(context, self.task_id), files=self.job_files(context),
        )  # fmt: skip

    # -- running ----------------------------------------------------------------------------------------

    def execute(self, context: Any) -> Any:
        for value in self.secrets.values():
            mask_secret(str(value))  # before anything could print them
        try:
            spec = self.build_spec(context)
            if self.policy == "race":
                placement = self._placement = self._place(spec)
                if self.deferrable:
                    self.log.info("Deferring: the triggerer claims the attempt that starts first; pid %s",
                                  os.getpid())  # fmt: skip
                    self._defer(placement=placement.to_json())
                job = placement.run()
            else:
                job = self._reattach_or_submit(spec)
        except offload.OffloadError as exc:
            raise AirflowException(str(exc)) from None
        self._job = job
        self._push(context, job_id=job.id)
        if self.deferrable:
            status = job.status()
            if not status.state.is_terminal:
                self.log.info("Deferring: job %s is %s; submitted from pid %s", job.id, status.describe(), os.getpid())
                self._defer(job_id=job.id, jobdir=job.ref.jobdir, index=job.ref.index, site=self._site_of(job))
        last = ""
        for line in job.logs(follow=True, interval=self.poll_interval):
            self.log.info("%s", line)
            last = line or last
        return self._end(context, job, job.wait(), last)

    def _defer(self, **where: Any) -> None:
        """Wait in the triggerer for the job (``job_id``, ``jobdir``, ``index``, ``site``), or for the placement
        whose attempt it claims first (``placement``)."""
        trigger = OffloadJobTrigger(**where, offload_conn_id=self.offload_conn_id, poll_interval=self.poll_interval,
                                    masks=[str(v) for v in self.secrets.values()], relay=bool(self.reach),
                                    result_key=self.result_key, **deferral())  # fmt: skip
        timeout = self.execution_timeout if isinstance(self.execution_timeout, timedelta) else None
        self.defer(trigger=trigger, method_name="execute_complete", timeout=timeout)

    def _place(self, spec: offload.JobSpec) -> offload.Placement:
        """The race of this try: the one an earlier try left (its attempts found by their name on each site,
        still queued or running), else a new one over the ``width`` best sites."""
        sites = offload.load_sites(self.site or "")
        left = [job for site in sites.sites for job in site.find(spec.name or "") if not job.status().state.is_terminal]
        if left:
            where = ", ".join(f"{job.site.name} {job.id}" for job in left)
            earlier = offload.Placement.adopt(left, name=spec.name, say=self.log.info)
            refused = self._reattach_refused()
            if refused is None:
                self.log.info("Going on with the race an earlier try left (attempts: %s)", where)
                return earlier
            self.log.warning("Cancelling the attempts an earlier try left (%s): %s", where, refused)
            earlier.cancel(refused)
        placement = sites.start(spec, policy="race", width=self.width, patience=None, say=self.log.info)
        self.log.info("Racing placement %s: attempts %s", placement.id,
                      ", ".join(f"{a.site} {a.job_id}" for a in placement.record.attempts if a.job_id))  # fmt: skip
        return placement

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        """Resume after the trigger: log what it had not shown yet, then finish."""
        for value in self.secrets.values():
            mask_secret(str(value))
        if event.get("error") and not event.get("job_id"):  # a race no attempt of which ran: nothing to stop
            raise AirflowException(f"placing the job failed: {event['error']}")
        site = OffloadHook(offload_conn_id=self.offload_conn_id, site=event.get("site") or self.site).get_site()
        job = site.job(event["job_id"], jobdir=event["jobdir"], index=event.get("index"))
        self._job = job
        self.result_key = event.get("result_key")
        self.log.info("Resumed in pid %s after the triggerer watched job %s", os.getpid(), job.id)
        if self.policy == "race":  # the triggerer claimed it: its id is known only now
            self._push(context, job_id=job.id)
        if event.get("error"):
            why = f"watching job {job.id} failed: {event['error']}"
            self._stop(job, why)
            raise AirflowException(why)
        last = event.get("last_line") or ""
        tail = job.output(int(event.get("log_offset") or 0)).decode("utf-8", "replace")
        for line in tail.splitlines():
            self.log.info("%s", line)
            last = line or last
        return self._end(context, job, job.status(), last)

    def resume_execution(self, next_method: str, next_kwargs: dict[str, Any] | None, context: Any) -> Any:
        """Airflow resumes a task whose deferral timed out, or whose trigger failed, only to raise: its job (or a
        race's attempts) may still run, so it is cancelled (or left, as ``cancel_on_failure`` says) before the
        error goes on."""
        try:
            return super().resume_execution(next_method, next_kwargs, context)
        except (TaskDeferralError, TaskDeferralTimeout) as exc:
            for job in self._live_jobs(context):
                self._stop(job, f"the deferred task ends ({exc or 'the trigger failed'}) while job {job.id} lives")
            raise

    def _stop(self, job: offload.Job, why: str) -> None:
        """The task fails while its job lives: cancel the job, or leave it and say so."""
        if self.cancel_on_failure:
            self.log.error("%s: cancelling it (cancel_on_failure=True)", why)
            try:
                job.cancel()
            except offload.OffloadError as exc:
                self.log.error("could not cancel job %s (%s): run 'offload cancel %s'", job.id, exc, job.id)
        else:
            self.log.warning("%s: leaving it running (cancel_on_failure=False); 'offload cancel %s' ends it", why,
                             job.id)  # fmt: skip

    def _live_jobs(self, context: Any) -> list[offload.Job]:
        """This task instance's jobs that are not over, on every site it may use (a race's attempts: several)."""
        live: list[offload.Job] = []
        try:
            for site in self.hook.get_sites():
                for job in site.find(self.job_name or deterministic_name(context, self.task_id)):
                    if not job.status().state.is_terminal:
                        live.append(job)
        except offload.OffloadError as exc:
            self.log.error("could not look for this task's job on the site: %s", exc)
        return live

    def _reattach_or_submit(self, spec: offload.JobSpec) -> offload.Job:
        # Only a job still queued or running is taken over: one that ended (even successfully) is not reused,
        # so a retry or a cleared task does the work again, as Airflow users expect. One that may not be taken
        # over is cancelled: it would otherwise run beside the new job, under the same name. Of several sites,
        # an earlier try's job may be on any of them.
        site = self.hook.get_site(spec)  # of several sites, where it starts first; the spec checked there
        site.validate(spec)
        refused = self._reattach_refused()
        for job in (job for candidate in self.hook.get_sites() for job in candidate.find(spec.name or "")):
            status = job.status()
            if status.state.is_terminal:
                continue
            if refused is None:
                self.log.info("Reattaching to job %s (%s) on %s, left by an earlier try", job.id, status.describe(),
                              job.site.name)  # fmt: skip
                return job
            self.log.warning("Cancelling job %s (%s) left by an earlier try: %s", job.id, status.describe(), refused)
            job.cancel()
        job = site.submit(spec)
        self.log.info("Submitted job %s to site %s (directory %s)", job.id, site.name, job.ref.jobdir)
        return job

    def _site_of(self, job: offload.Job) -> str | None:
        """The site name a trigger (or the resumed task) finds ``job`` by: the one it went to, of several."""
        return job.site.name if self.offload_conn_id is None else self.site

    def _reattach_refused(self) -> str | None:
        """Why a live job of an earlier try must not be taken over (None: it may be)."""
        return None if self.reattach_on_restart else "reattach_on_restart=False asks for a new job for each try"

    def _push(self, context: Any, **values: Any) -> None:
        """XComs under their keys, only when the task pushes XComs at all (BaseOperator's ``do_xcom_push``)."""
        if self.do_xcom_push:
            for key, value in values.items():
                context["ti"].xcom_push(key=key, value=value)

    def _end(self, context: Any, job: offload.Job, status: offload.JobStatus, last_line: str) -> Any:
        """Finish the task, then clean the job's directory as ``cleanup`` asks (after everything read from it)."""
        succeeded = False
        try:
            value = self._finish(context, job, status, last_line)
            succeeded = True
            return value
        finally:
            if self.cleanup == "always" or (self.cleanup == "on_success" and succeeded):
                self._remove_jobdir(job, status)

    def _remove_jobdir(self, job: offload.Job, status: offload.JobStatus) -> None:
        """Remove an ended job's directory; never fails the task (the work is done), says what it left instead.

        offload's core has no call that removes a job directory, so this checks the path itself: one directory
        directly in the site's ``<workdir>/jobs``, of a job that is not an array element (an array shares it).
        """
        jobdir = job.ref.jobdir
        try:
            jobs = f"{job.site.workdir()}/jobs"
            mine = (posixpath.dirname(jobdir) == jobs and posixpath.basename(jobdir) not in ("", ".", "..")
                    and job.ref.index is None)  # fmt: skip
            if not status.state.is_terminal or not mine:
                self.log.warning("Not removing %s (cleanup=%r): not the directory of one ended job in %s", jobdir,
                                 self.cleanup, jobs)  # fmt: skip
                return
            job.site.transport_run(["rm", "-rf", "--", jobdir])
            self.log.info("Removed job %s's directory %s (cleanup=%r)", job.id, jobdir, self.cleanup)
        except offload.OffloadError as exc:
            self.log.warning("Could not remove job %s's directory %s (%s): it is left on the site; remove it with "
                             "'rm -rf %s' there", job.id, jobdir, exc, jobdir)  # fmt: skip

    def _finish(self, context: Any, job: offload.Job, status: offload.JobStatus, last_line: str) -> Any:
        self._push(context, state=status.state.value, exit_code=status.exit_code)
        if status.exit_code is not None and status.exit_code in self.skip_on_exit_code:
            raise AirflowSkipException(f"job {job.id} exited with {status.exit_code}: skipping (skip_on_exit_code)")
        if status.state is not offload.JobState.COMPLETED:
            lines = job.tail(self.log_tail_lines)
            raise AirflowException(f"job {job.id} ended {status.describe()}. Last lines of its log:\n{lines}")
        # Without do_xcom_push nobody reads the value: @task.offload's result is then not even fetched.
        return self.result(job, last_line) if self.do_xcom_push else None

    def result(self, job: offload.Job, last_line: str) -> Any:
        """The task's return value (XCom): the last line of the job's output."""
        return last_line

    def on_kill(self) -> None:
        if self._job is not None:
            self.log.info("Task killed: cancelling job %s", self._job.id)
            self._job.cancel()
        elif self._placement is not None:
            self.log.info("Task killed: releasing and cancelling the attempts of placement %s", self._placement.id)
            self._placement.cancel("the task was killed")


def _templated(value: Any) -> bool:
    return isinstance(value, str) and "{{" in value


def deterministic_name(context: Any, task_id: str) -> str:
    """The same for every try of one task instance (dag, task, run, map index), unique across them."""
    ti = context["ti"]
    key = f"{ti.dag_id}|{ti.task_id}|{ti.run_id}|{getattr(ti, 'map_index', -1)}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9._-]", "-", task_id)[:40].strip("-.") or "task"
    return f"{stem}-{digest}"
