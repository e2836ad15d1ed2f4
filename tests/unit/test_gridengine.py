"""The Grid Engine plugin's directives and parsers. Every input below is real output, captured from the Grid
Engine 8.1.9 cell ``scripts/testsite-gridengine up`` makes (Debian's packages; exec hosts ge1 and ge2), trimmed
only of fields offload does not read where marked."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from offload import SiteConfig, profile_from_table
from offload.errors import ConfigError
from offload.jobs import JobRef, JobState
from offload.schedulers.gridengine import (
    GridEngineScheduler,
    parse_capacities,
    parse_qacct,
    parse_qhost,
    parse_qstat,
    parse_qstat_j,
)
from offload.script import BatchScript
from offload.spec import JobSpec, Resources

SCRIPT = Path(__file__).parents[2] / "scripts" / "testsite-gridengine"

# `qstat -u hpcuser -xml` (JAT_prio, JAT_start_time, JB_submission_time lines removed): a running job, an array
# with two tasks running and four pending as a range, a held job.
QSTAT = """<?xml version='1.0'?>
<job_info  xmlns:xsd="http://arc.liv.ac.uk/repos/darcs/sge/source/dist/util/resources/schemas/qstat/qstat.xsd">
  <queue_info>
    <job_list state="running">
      <JB_job_number>26</JB_job_number>
      <JB_name>cap-hrt</JB_name>
      <JB_owner>hpcuser</JB_owner>
      <state>r</state>
      <queue_name>offload.q@ge1</queue_name>
      <slots>1</slots>
    </job_list>
    <job_list state="running">
      <JB_job_number>27</JB_job_number>
      <JB_name>cap-wait</JB_name>
      <JB_owner>hpcuser</JB_owner>
      <state>r</state>
      <queue_name>offload.q@ge2</queue_name>
      <slots>1</slots>
      <tasks>1</tasks>
    </job_list>
    <job_list state="running">
      <JB_job_number>27</JB_job_number>
      <JB_name>cap-wait</JB_name>
      <JB_owner>hpcuser</JB_owner>
      <state>r</state>
      <queue_name>offload.q@ge1</queue_name>
      <slots>1</slots>
      <tasks>2</tasks>
    </job_list>
  </queue_info>
  <job_info>
    <job_list state="pending">
      <JB_job_number>27</JB_job_number>
      <JB_name>cap-wait</JB_name>
      <JB_owner>hpcuser</JB_owner>
      <state>qw</state>
      <queue_name></queue_name>
      <slots>1</slots>
      <tasks>3-6:1</tasks>
    </job_list>
    <job_list state="pending">
      <JB_job_number>28</JB_job_number>
      <JB_name>cap-held</JB_name>
      <JB_owner>hpcuser</JB_owner>
      <state>hqw</state>
      <queue_name></queue_name>
      <slots>1</slots>
    </job_list>
  </job_info>
</job_info>
"""

# `qacct -j 26` (h_rt=3, killed by the qmaster), `qacct -j 7` (exit 3), `qacct -j 1` (exit 0), `qacct -j 27`
# (an array whose tasks were qdel'd while running); only the lines offload reads are kept.
QACCT = """==============================================================
jobnumber    26
taskid       undefined
hostname     ge1
failed       37  : qmaster enforced h_rt, h_cpu, or h_vmem limit
exit_status  137                  (Killed)
ru_wallclock 4s
category     -l h_rt=3
==============================================================
qname        offload.q
hostname     ge1
jobname      cap-fail
jobnumber    7
taskid       undefined
failed       0
exit_status  3
ru_wallclock 0s
category     NONE
==============================================================
hostname     ge1
jobnumber    1
taskid       undefined
failed       0
exit_status  0
ru_wallclock 0s
category     NONE
==============================================================
hostname     ge2
jobname      cap-wait
jobnumber    27
taskid       1
failed       100 : assumedly after job
exit_status  137                  (Killed)
ru_wallclock 13s
category     -l gpu=2
"""

# `qhost -xml -q -F gpu` with one job on each host, and `qconf -se ge1` (continuation lines as qconf prints them)
QHOST = """<?xml version='1.0'?>
<qhost xmlns:xsd="http://arc.liv.ac.uk/repos/darcs/sge/source/dist/util/resources/schemas/qhost/qhost.xsd">
 <host name='global'>
   <hostvalue name='arch_string'>-</hostvalue>
   <hostvalue name='num_proc'>-</hostvalue>
   <hostvalue name='m_socket'>-</hostvalue>
   <hostvalue name='m_core'>-</hostvalue>
   <hostvalue name='m_thread'>-</hostvalue>
   <hostvalue name='load_avg'>-</hostvalue>
   <hostvalue name='mem_total'>-</hostvalue>
   <hostvalue name='mem_used'>-</hostvalue>
   <hostvalue name='swap_total'>-</hostvalue>
   <hostvalue name='swap_used'>-</hostvalue>
 </host>
 <host name='ge1'>
   <hostvalue name='arch_string'>lx-amd64</hostvalue>
   <hostvalue name='num_proc'>2</hostvalue>
   <hostvalue name='m_socket'>1</hostvalue>
   <hostvalue name='m_core'>2</hostvalue>
   <hostvalue name='m_thread'>2</hostvalue>
   <hostvalue name='load_avg'>1.50</hostvalue>
   <hostvalue name='mem_total'>23.5G</hostvalue>
   <hostvalue name='mem_used'>1.3G</hostvalue>
   <hostvalue name='swap_total'>0.0</hostvalue>
   <hostvalue name='swap_used'>0.0</hostvalue>
   <resourcevalue name='gpu' dominance='hc'>2.000000</resourcevalue>
 <queue name='offload.q'>
   <queuevalue qname='offload.q' name='qtype_string'>BIP</queuevalue>
   <queuevalue qname='offload.q' name='slots_used'>1</queuevalue>
   <queuevalue qname='offload.q' name='slots'>4</queuevalue>
   <queuevalue qname='offload.q' name='slots_resv'>0</queuevalue>
   <queuevalue qname='offload.q' name='state_string'></queuevalue>
 </queue>
 </host>
 <host name='ge2'>
   <hostvalue name='arch_string'>lx-amd64</hostvalue>
   <hostvalue name='num_proc'>2</hostvalue>
   <hostvalue name='m_socket'>1</hostvalue>
   <hostvalue name='m_core'>2</hostvalue>
   <hostvalue name='m_thread'>2</hostvalue>
   <hostvalue name='load_avg'>1.47</hostvalue>
   <hostvalue name='mem_total'>23.5G</hostvalue>
   <hostvalue name='mem_used'>1.2G</hostvalue>
   <hostvalue name='swap_total'>0.0</hostvalue>
   <hostvalue name='swap_used'>0.0</hostvalue>
   <resourcevalue name='gpu' dominance='hc'>2.000000</resourcevalue>
 <queue name='offload.q'>
   <queuevalue qname='offload.q' name='qtype_string'>BIP</queuevalue>
   <queuevalue qname='offload.q' name='slots_used'>1</queuevalue>
   <queuevalue qname='offload.q' name='slots'>4</queuevalue>
   <queuevalue qname='offload.q' name='slots_resv'>0</queuevalue>
   <queuevalue qname='offload.q' name='state_string'></queuevalue>
 </queue>
 </host>
</qhost>
"""
QCONF_SE = """hostname              ge1
load_scaling          NONE
complex_values        gpu=2
load_values           load_avg=2.200684,load_short=1.965332, \\
                      num_proc=2
processors            2
hostname              ge2
complex_values        mem_free=1G, \\
                      gpu=2
"""

# `qstat -xml -j cap-wait` (an array of 6 submitted with -wd /tmp/gecap), only the job's own fields kept
QSTAT_J = """<detailed_job_info>
  <djob_info>
    <element>
      <JB_job_number>27</JB_job_number>
      <JB_owner>hpcuser</JB_owner>
      <JB_job_name>cap-wait</JB_job_name>
      <JB_cwd>/tmp/gecap</JB_cwd>
      <JB_ja_structure>
        <task_id_range>
          <RN_min>1</RN_min>
          <RN_max>6</RN_max>
          <RN_step>1</RN_step>
        </task_id_range>
      </JB_ja_structure>
    </element>
  </djob_info>
</detailed_job_info>
"""


def scheduler(**keys) -> GridEngineScheduler:
    table = {"host": "h", "scheduler": "gridengine", "partition": "offload.q", "gpus_per_node": 2,
             "parallel_environment": "offload", **keys}  # fmt: skip
    return GridEngineScheduler(profile_from_table("ge", table, "test"))


def test_profile_keys_are_the_plugin_s_and_checked():
    config = profile_from_table("ge", {"host": "h", "scheduler": "gridengine", "parallel_environment": "mpi"}, "t")
    assert config.scheduler_keys == {"parallel_environment": "mpi"}
    with pytest.raises(ConfigError, match="parallel_environment.*must be a str"):
        profile_from_table("ge", {"host": "h", "scheduler": "gridengine", "parallel_environment": 3}, "t")
    with pytest.raises(ConfigError, match="unknown key 'parallel_environment'"):
        profile_from_table("s", {"host": "h", "scheduler": "slurm", "parallel_environment": "mpi"}, "t")


def test_directives_of_a_gpu_job_and_of_an_array():
    ge = scheduler(walltime="01:00:00")
    lines = ge.directives(JobSpec(["x"], name="n", resources=Resources(gpus=2)), "/w/j1", None)
    assert lines == ["#$ -N n", "#$ -wd /w/j1", "#$ -j y", "#$ -S /bin/bash", "#$ -o /w/j1/output",
                     "#$ -pe offload 1", "#$ -q offload.q", "#$ -l gpu=2", "#$ -l h_rt=3600"]  # fmt: skip
    array = ge.directives(JobSpec(["x"], name="n"), "/w/j2", 3, parallelism=2)
    assert "#$ -t 1-3" in array and "#$ -tc 2" in array and "#$ -o /w/j2/output.ge.$TASK_ID" in array
    assert array[-2:] == ["offload_ge_task=$((SGE_TASK_ID - 1))", 'exec > /w/j2/output."$offload_ge_task" 2>&1']


def test_multi_node_gpus_are_per_node_and_refusals_say_why():
    ge = scheduler()
    lines = ge.directives(JobSpec(["x"], resources=Resources(nodes=2, gpus_per_node=2)), "/w/j", None)
    assert "#$ -pe offload 2" in lines and "#$ -l gpu=2" in lines
    with pytest.raises(ConfigError, match="site 'ge' has 2"):
        ge.directives(JobSpec(["x"], resources=Resources(gpus=3)), "/w/j", None)
    with pytest.raises(ConfigError, match="needs a parallel environment"):
        GridEngineScheduler(SiteConfig(name="x", host="h", scheduler="gridengine")).directives(
            JobSpec(["x"], resources=Resources(nodes=2)), "/w/j", None
        )
    with pytest.raises(ConfigError, match="characters"):
        ge.directives(JobSpec(["x"], resources=Resources(partition="a b")), "/w/j", None)


def test_the_array_index_is_offload_s_in_the_batch_script(tmp_path):
    """Grid Engine numbers tasks from 1; the batch script's OFFLOAD_TASK_INDEX and output file are 0-based."""
    ge = scheduler()
    script = BatchScript(directives=ge.directives(JobSpec(["x"]), str(tmp_path), 2), jobdir=str(tmp_path),
                         task_index=ge.task_index, command=["sh", "-c", "echo index=$OFFLOAD_TASK_INDEX"])  # fmt: skip
    (tmp_path / "job.sh").write_text(script.render())
    for task in ("1", "2"):
        subprocess.run(["bash", str(tmp_path / "job.sh")], env={"SGE_TASK_ID": task, "PATH": "/usr/bin:/bin"})
    assert (tmp_path / "output.0").read_text() == "index=0\n"
    assert (tmp_path / "output.1").read_text() == "index=1\n"
    assert (tmp_path / "exitcode.1").read_text() == "0\n"
    single = BatchScript(directives=ge.directives(JobSpec(["x"]), str(tmp_path), None), jobdir=str(tmp_path),
                         task_index=ge.task_index, command=["true"])  # fmt: skip
    (tmp_path / "one.sh").write_text(single.render())
    subprocess.run(["bash", str(tmp_path / "one.sh")], env={"SGE_TASK_ID": "undefined", "PATH": "/usr/bin:/bin"})
    assert (tmp_path / "exitcode").read_text() == "0\n"


def test_qsub_terse_answers():
    ge = scheduler()
    assert ge.job_ids("14\n", None) == ["14"]
    assert ge.job_ids("3.1-3:1\n", 3) == ["3.1", "3.2", "3.3"]
    assert ge.job_ids("welcome to the cluster\n27.1-6:1\n", 6)[-1] == "27.6"
    assert ge.ids_in("quota: 85 GB\n14\n3.1-3:1\n") == ["14", "3"]
    with pytest.raises(ValueError, match="instead of a job id"):
        ge.job_ids("Unable to run job: error", None)


def test_qstat_states_with_array_ranges_expanded():
    found = parse_qstat(QSTAT)
    assert found[("26", None)].state is JobState.RUNNING and found[("26", None)].node == "ge1"
    assert found[("27", 1)].node == "ge2" and found[("27", 2)].node == "ge1"
    assert all(found[("27", t)].state is JobState.PENDING for t in (3, 4, 5, 6))
    assert found[("28", None)].state is JobState.PENDING and found[("28", None)].reason == "held"


def test_qacct_records():
    found = parse_qacct(QACCT)
    assert found[("26", None)].state is JobState.TIMEOUT
    assert (found[("7", None)].state, found[("7", None)].exit_code) == (JobState.FAILED, 3)
    assert (found[("1", None)].state, found[("1", None)].exit_code) == (JobState.COMPLETED, 0)
    killed = found[("27", 1)]
    assert (killed.state, killed.signal, killed.node) == (JobState.FAILED, 9, "ge2")


def test_qhost_nodes_with_gpus_used_from_the_configured_total():
    capacities = parse_capacities(QCONF_SE, "gpu")
    assert capacities == {"ge1": 2, "ge2": 2}
    nodes = {n.name: n for n in parse_qhost(QHOST, capacities, "gpu")}
    assert set(nodes) == {"ge1", "ge2"}
    ge1 = nodes["ge1"]
    assert (ge1.partitions, ge1.gpus, ge1.cpus, ge1.cpus_used, ge1.available) == (("offload.q",), 2, 2, 1, True)
    assert ge1.memory_mb == int(23.5 * 1024)
    disabled = parse_qhost(QHOST.replace("name='state_string'></queuevalue>", "name='state_string'>d</queuevalue>"),
                           capacities, "gpu")  # fmt: skip
    assert not any(n.available for n in disabled) and all(n.gpus_free == 0 for n in disabled)


def test_find_reads_qstat_j():
    refs = parse_qstat_j(QSTAT_J, "hpcuser")
    assert [(r.id, r.jobdir, r.index) for r in refs][:2] == [("27.1", "/tmp/gecap", 0), ("27.2", "/tmp/gecap", 1)]
    assert len(refs) == 6
    assert parse_qstat_j(QSTAT_J, "someone-else") == []
    assert parse_qstat_j("<unknown_jobs><ST_name>x</ST_name></unknown_jobs>", "hpcuser") == []


def test_a_command_in_a_running_job_is_one_quoted_line_for_qrsh():
    argv = scheduler()._inherit(JobRef("27.2", "/w"), "ge1", ["sh", "-c", "echo 'a  b'; x"], ["-pty", "n"])
    assert argv == ["env", "JOB_ID=27", "SGE_TASK_ID=2", "qrsh", "-inherit", "-pty", "n", "ge1",
                    "sh -c 'echo '\"'\"'a  b'\"'\"'; x'"]  # fmt: skip


def test_the_script_is_strict_and_names_a_failing_line():
    text = SCRIPT.read_text()
    assert "set -Eeuo pipefail" in text and "trap '" in text and "$LINENO" in text
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    usage = subprocess.run([str(SCRIPT), "bogus"], capture_output=True, text=True)
    assert usage.returncode == 2 and "up|install|down|purge|status" in usage.stderr


def test_the_secrets_sweep_keeps_queued_jobs_secrets_only(tmp_path):
    """The submission program's sweep (the same as SLURM's, with qstat's list and qsub's answers): a job that left
    the queue without starting loses its secrets file, a queued one (an array, '28.1-3:1') keeps it."""
    import os
    import shlex
    import time

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # qstat -u USER's layout: two header lines, then one line per job (job 28 still queued)
    (bin_dir / "qstat").write_text("#!/bin/sh\nprintf 'job-ID prior name\\n-----\\n     28 0.5 x hpcuser qw\\n'\n")
    (bin_dir / "qstat").chmod(0o755)
    old = time.time() - 600
    for name, jobid in (("gone", "Your job 27 has been submitted\n27\n"), ("queued", "28.1-3:1\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "jobid").write_text(jobid)
        (tmp_path / name / "secrets.env").write_text("export T=v\n")
        os.utime(tmp_path / name / "secrets.env", (old, old))
    (line,) = GridEngineScheduler(SiteConfig(name="x", host="h", scheduler="gridengine")).sweep_lines(str(tmp_path))
    subprocess.run(["sh", "-c", shlex.split(line)[3]], check=True, env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
                   timeout=30)  # fmt: skip
    assert not (tmp_path / "gone" / "secrets.env").exists()
    assert (tmp_path / "queued" / "secrets.env").exists()
