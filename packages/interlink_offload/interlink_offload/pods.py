"""A Kubernetes pod as one offload job: the translation, and the pod's state read back from the job.

The job runs a driver on its node (outside any container, ``JobSpec(container=False)``) that starts each
container of the pod in the site's runtime with its own image: init containers one after another, stopping at
the first that fails; then the containers together. Each container's output goes to ``container-<name>.log`` in the
job's directory and its start and exit to ``pod-state``, which ``/status`` and ``/getLogs`` read back.

What a pod may hold, and how it lands:

* ``command``/``args``, as Kubernetes has them: ``command`` replaces the image's ENTRYPOINT (and drops its CMD),
  ``args`` replace its CMD; the driver always names the whole argv, which every runtime runs as the whole
  command (``apptainer exec``, ``ch-run``, ``podman run --entrypoint``), so what runs is what Kubernetes runs. The
  image's ENTRYPOINT and CMD are known for images from offload's cache (pulled on the login node, or pushed from
  an archive); a container of any other image (a path on the site) needs ``command``;
* ``env`` values. The Virtual Kubelet has already turned ``envFrom`` (always) and ``valueFrom`` ConfigMap and
  Secret keys (with its ``SkipDownwardAPIResolution``) into plain values, so any value may be a Secret's: every
  value travels as an offload secret (a 0600 file read and removed by the job), never in the batch script. A
  ``valueFrom`` left unresolved is followed only into an object interLink sent (one the pod mounts);
* ``volumeMounts`` of ConfigMap, Secret, projected and ``emptyDir`` volumes: files staged into the job's
  directory and bound at ``mountPath`` (directories; ``subPath`` is refused). interLink sends the objects of
  mounted volumes only; a projected volume arrives as ONE ConfigMap named after the volume, its keys the file
  paths (the Virtual Kubelet's ``remoteExecutionHandleVolumes`` fills it from the token, ConfigMap and downward
  API sources and drops Secret sources). Secret and projected files (the service account token) are 0600 and
  removed when the pod ends;
* limits (or requests): ``cpu`` -> cores, ``memory`` -> memory, ``nvidia.com/gpu`` -> GPUs, for the pod as
  Kubernetes counts it (the largest init container, or all containers together); the annotation
  ``slurm-job.vk.io/flags`` adds scheduler options, checked like any other;
* probes and lifecycle hooks are ignored (said in the job's log): the job's own state is what counts.
"""

from __future__ import annotations

import base64
import io
import math
import re
import shlex
import tarfile
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import offload
from offload import ConfigError

FLAGS_ANNOTATION = "slurm-job.vk.io/flags"
GPU_RESOURCE = "nvidia.com/gpu"
# Exit codes that carry a job's end into Kubernetes, where the Virtual Kubelet keeps only exit codes.
EXIT_CODES = {offload.JobState.TIMEOUT: 124, offload.JobState.CANCELLED: 143, offload.EndCause.OUT_OF_MEMORY: 137,
              offload.EndCause.NODE_FAILURE: 255, offload.EndCause.PREEMPTED: 143}  # fmt: skip
# A container killed by SIGKILL (137) while its job still runs may have been killed for memory, which the
# scheduler says only once the job ends; the Virtual Kubelet stops asking about a pod once all its containers
# are terminated, so such a container is shown running until its job's end is known, or for this many seconds
# after its kill (a SIGKILL that does not end the job: the container ends as "Error").
KILLED_HOLD = 30.0
# Where the job's directory goes in a container's command line, until the driver knows it ("$d")
_JOBDIR = "/offload-job-directory"


STATE_FILE = "pod-state"


def log_file(container: str) -> str:
    """The file in the job's directory that holds one container's output."""
    return f"container-{container}.log"


def job_name(uid: str) -> str:
    """The job name a pod's job gets: its UID, so a restarted plugin finds it (and a repeat /create too)."""
    return "pod-" + re.sub(r"[^A-Za-z0-9._-]", "-", uid)[:59]


def _quantity_cpus(value: Any) -> int:
    text = str(value).strip()
    if text.endswith("m"):
        return max(1, math.ceil(int(text[:-1]) / 1000))
    return max(1, math.ceil(float(text)))


# A memory quantity as Kubernetes writes it (case matters there: "m" is a thousandth, not mega); its value is
# offload's to read, by the decimal rule (Mi is 2**20, M 10**6).
_QUANTITY = re.compile(r"(?:\d+\.?\d*|\.\d+)(?:Ki|Mi|Gi|Ti|Pi|k|K|M|G|T|P)?")


def _quantity_bytes(value: Any) -> int:
    text = str(value).strip()
    if not _QUANTITY.fullmatch(text):
        raise ConfigError(f"memory quantity {value!r} is not one Kubernetes knows (e.g. 512Mi, 2Gi)")
    return offload.parse_size(text, binary=False)


def _needs(container: dict) -> tuple[int, int, int]:
    """(cores, bytes of memory, GPUs) of one container: its limits, else its requests."""
    resources = container.get("resources") or {}
    asked = {**(resources.get("requests") or {}), **(resources.get("limits") or {})}
    cpus = _quantity_cpus(asked["cpu"]) if "cpu" in asked else 0
    memory = _quantity_bytes(asked["memory"]) if "memory" in asked else 0
    gpus = int(asked.get(GPU_RESOURCE, 0) or 0)
    return cpus, memory, gpus


def _data_of(objects: list[dict] | None, kind: str) -> dict[str, dict[str, bytes]]:
    """name -> key -> bytes, for the ConfigMaps (``data`` text, ``binaryData`` base64) or Secrets (``data``
    base64, ``stringData`` text) interLink sends with a container."""
    found: dict[str, dict[str, bytes]] = {}
    for obj in objects or []:
        name = (obj.get("metadata") or {}).get("name", "")
        values: dict[str, bytes] = {}
        if kind == "secret":
            values.update({k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()})
            values.update({k: v.encode() for k, v in (obj.get("stringData") or {}).items()})
        else:
            values.update({k: v.encode() for k, v in (obj.get("data") or {}).items()})
            values.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        found[name] = values
    return found


class _Staging:
    """The files a pod's volumes hold, as one archive unpacked into ``volumes/`` of the job's directory."""

    def __init__(self) -> None:
        self.dirs: list[str] = []
        self.files: list[tuple[str, bytes, int]] = []

    def directory(self, path: str) -> None:
        parts = path.split("/")
        for depth in range(1, len(parts) + 1):
            if (part := "/".join(parts[:depth])) not in self.dirs:
                self.dirs.append(part)

    def file(self, path: str, data: bytes, mode: int) -> None:
        if ".." in path.split("/") or path.startswith("/"):
            raise ConfigError(f"volume file {path!r} leaves its volume")
        self.directory(path.rsplit("/", 1)[0])
        self.files.append((path, data, mode))

    def archive(self) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for path in self.dirs:
                info = tarfile.TarInfo(path)
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            for path, data, mode in self.files:
                info = tarfile.TarInfo(path)
                info.size, info.mode = len(data), mode
                tar.addfile(info, io.BytesIO(data))
        return buffer.getvalue()


def _volume_files(volume: dict, configmaps: dict, secrets: dict, projected: dict, staging: _Staging, where: str,
                  notes: list[str]) -> None:  # fmt: skip
    """Stage what ``volume`` holds under ``where`` (an emptyDir stays an empty directory). ``projected`` maps a
    projected volume's NAME to its files, as the Virtual Kubelet sends them."""

    def items(source: dict, values: dict[str, bytes], label: str) -> list[tuple[str, bytes]]:
        chosen = source.get("items")
        if not chosen:
            return sorted(values.items())
        picked = []
        for item in chosen:
            if item["key"] not in values:
                if source.get("optional"):
                    continue
                raise ConfigError(f"{label} has no key {item['key']!r}")
            picked.append((item.get("path") or item["key"], values[item["key"]]))
        return picked

    def one(kind: str, source: dict, base: str) -> None:
        name = source.get("name") or source.get("secretName") or ""
        values = (secrets if kind == "secret" else configmaps).get(name)
        if values is None:
            if source.get("optional"):
                return
            raise ConfigError(f"volume {volume['name']!r}: {kind} {name!r} was not sent with the pod")
        for path, data in items(source, values, f"{kind} {name!r}"):
            staging.file(f"{base}/{path}", data, 0o600 if kind == "secret" else 0o644)

    staging.directory(where)
    if "configMap" in volume:
        one("configMap", volume["configMap"], where)
    elif "secret" in volume:
        one("secret", volume["secret"], where)
    elif "projected" in volume:
        files = projected.get(volume["name"])
        if files is None:  # the VK's DisableProjectedVolumes: it sends none, and Kubernetes would not refuse
            notes.append(f"offload: interLink sent no files for projected volume {volume['name']!r}: it is empty")
            return
        for path, data in sorted(files.items()):  # a token among them: 0600, as a secret
            staging.file(f"{where}/{path}", data, 0o600)
    elif "emptyDir" not in volume:
        kinds = sorted(set(volume) - {"name"})
        raise ConfigError(f"volume {volume['name']!r} is a {', '.join(kinds)} volume: offload stages ConfigMap, "
                          "Secret, projected and emptyDir volumes only")  # fmt: skip


def plan_pod(site: offload.Site, data: dict, images: dict[str, str],
             commands: Mapping[str, tuple[Sequence[str], Sequence[str]]] | None = None) -> offload.JobSpec:  # fmt: skip
    """The job for interLink's ``RetrievedPodData`` ``data``; ``images`` maps each container's image to what the
    site runs (already resolved: cache paths), ``commands`` maps it to the image's (ENTRYPOINT, CMD) where offload
    knows them (images from its cache), for containers that give no ``command``. Raises ConfigError, with what to
    change, for what it cannot run."""
    pod = data.get("pod") or {}
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    uid = meta.get("uid")
    if not uid:
        raise ConfigError("the pod has no metadata.uid")
    configmaps: dict[str, dict[str, bytes]] = {}
    projected: dict[str, dict[str, bytes]] = {}
    secrets_data: dict[str, dict[str, bytes]] = {}
    for container in data.get("container") or []:  # what interLink's retrieveData sent for each container
        configmaps.update(_data_of(container.get("configMaps"), "configMap"))
        projected.update(_data_of(container.get("projectedvolumemaps"), "configMap"))
        secrets_data.update(_data_of(container.get("secrets"), "secret"))
    init = list(spec.get("initContainers") or [])
    main = list(spec.get("containers") or [])
    if not main:
        raise ConfigError("the pod has no containers")
    # interLink sends the objects of mounted volumes only: a volume no container mounts has nothing to stage
    mounted = {m.get("name") for c in init + main for m in c.get("volumeMounts") or []}
    volumes = {v["name"]: v for v in spec.get("volumes") or [] if v.get("name") in mounted}
    staging = _Staging()
    notes: list[str] = []
    for name, volume in volumes.items():
        _volume_files(volume, configmaps, secrets_data, projected, staging, _safe(name), notes)
    secrets: dict[str, str] = {}
    lines = _driver_head()
    holding_secrets = [name for name, v in volumes.items() if "secret" in v or "projected" in v]
    if holding_secrets:  # the pod's secret files (and its service account token) go with the pod
        paths = " ".join(f'"$d/volumes/{name}"' for name in holding_secrets)
        lines.append(f"trap {shlex.quote(f'rm -rf {paths}')} EXIT")
    if any(c.get(k) for c in init + main for k in ("livenessProbe", "readinessProbe", "startupProbe", "lifecycle")):
        notes.append("offload: probes and lifecycle hooks of this pod are ignored (the job's own state counts)")
    runs = []
    for index, container in enumerate(init + main):
        runs.append(_container_run(site, container, index, images, commands or {}, volumes, configmaps,
                                   secrets_data, secrets, notes))  # fmt: skip
    for note in notes:  # in the job's own output, as Kubernetes says such things in events, not in a container's log
        lines.append(f"echo {shlex.quote(note)} >&2")
    for container, run in zip(init, runs[: len(init)], strict=True):
        name = shlex.quote(container["name"])
        lines += [f"{run} ", f'rc=$?; if [ "$rc" != 0 ]; then echo "offload: init container "{name}" failed with '
                  'exit code $rc" >&2; exit "$rc"; fi']  # fmt: skip
    for i, run in enumerate(runs[len(init) :]):
        lines.append(f"{run} & pid{i}=$!")
    lines.append("first=0")
    for i in range(len(main)):
        lines.append(f'wait "$pid{i}"; rc=$?; if [ "$first" = 0 ] && [ "$rc" != 0 ]; then first=$rc; fi')
    lines.append('exit "$first"')
    cpus_init = [_needs(c) for c in init]
    cpus_main = [_needs(c) for c in main]
    total = tuple(sum(n[i] for n in cpus_main) for i in range(3))
    need = tuple(max([total[i], *(n[i] for n in cpus_init)]) for i in range(3))
    annotations = meta.get("annotations") or {}
    extra = tuple(shlex.split(annotations.get(FLAGS_ANNOTATION, "")))
    resources = offload.Resources(gpus=need[2], cpus=need[0] or None,
                                  memory=max(1, math.ceil(need[1] / 2**20)) if need[1] else None,
                                  extra=extra)  # fmt: skip
    files = {"volumes/": staging.archive()} if volumes else {}
    job = offload.JobSpec(["bash", "-c", "\n".join(lines)], container=False, resources=resources, secrets=secrets,
                          files=files, name=job_name(uid))  # fmt: skip
    return job


def _service_account(volume: dict) -> bool:
    """Whether ``volume`` is the projected one Kubernetes' ServiceAccount admission adds to every pod (its
    ``serviceAccountToken`` source), whatever its generated name (``kube-api-access-<random>``)."""
    sources = (volume.get("projected") or {}).get("sources") or []
    return any("serviceAccountToken" in source for source in sources)


def _safe(name: str) -> str:
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name or ""):
        raise ConfigError(f"{name!r} is not a Kubernetes name")
    return name


def _driver_head() -> list[str]:
    return [
        'd="$OFFLOAD_JOB_DIR"; mkdir -p "$d/volumes"',
        f'state() {{ printf "%s %s\\n" "$*" "$(date +%s)" >> "$d/{STATE_FILE}"; }}',
        # the secrets file's values are this driver's environment: each container gets only its own
        'drop_secrets() { for v in ${!POD_SECRET_@}; do unset "$v"; done; }',
    ]


def _argv(name: str, container: dict, image_run: tuple[Sequence[str], Sequence[str]] | None) -> list[str]:
    """A container's argv by Kubernetes' rule: ``command`` replaces the image's ENTRYPOINT and drops its CMD,
    ``args`` replace its CMD; ``image_run`` is the image's (ENTRYPOINT, CMD), None where offload does not know
    them. ConfigError where that leaves nothing to run."""
    command, args = container.get("command") or [], container.get("args") or []
    entrypoint, cmd = image_run or ((), ())
    argv = [*(command or entrypoint), *(args if command or args else cmd)]
    if argv:
        return argv
    image = container.get("image")
    if image_run is None:
        why = (f"offload does not know the ENTRYPOINT and CMD of its image {image!r}: only images from offload's "
               "cache (pulled on the login node, or pushed with 'offload image push') have their config known, a "
               "path on the site has not")  # fmt: skip
    else:
        why = (f"its image {image!r} has no ENTRYPOINT or CMD in offload's image cache (an image pushed before "
               "offload kept them has none there: push it again)")  # fmt: skip
    raise ConfigError(f'container {name!r} gives no command, and {why}. Give \'command\', e.g. ["python3", "app.py"]')


def _container_run(site: offload.Site, container: dict, index: int, images: dict[str, str],
                   commands: Mapping[str, tuple[Sequence[str], Sequence[str]]], volumes: dict, configmaps: dict,
                   secrets_data: dict, secrets: dict[str, str], notes: list[str]) -> str:  # fmt: skip
    """The shell line that runs one container, recording its start, output and exit."""
    name = _safe(container.get("name", ""))
    image = images.get(container.get("image", ""))
    if not image:
        raise ConfigError(f"container {name!r} names no image")
    argv = _argv(name, container, commands.get(container.get("image", "")))
    cached = container.get("image", "") in commands  # an image of offload's cache: the user's, writable
    exports: list[str] = []
    names: list[str] = []

    def put(var: str, value: str) -> None:
        # every value as a secret: the VK has put Secret keys into env[].value, and nothing says which were
        if not offload.ENV_NAME.match(var):  # e.g. a ConfigMap's "app.ini" the VK's envFrom made a variable of
            notes.append(f"offload: container {name!r}: {var!r} is no shell variable name: not set")
            return
        names.append(var)
        slot = f"POD_SECRET_{index}_{len(secrets)}"
        secrets[slot] = value
        exports.append(f'export {var}="${{{slot}}}"')

    # the VK turns envFrom into env values before interLink sees the pod (resolveEnvFromRefs); one still here
    # came another way, and is read from the objects sent with the pod
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix") or ""
        secret = bool(source.get("secretRef"))
        ref = source.get("secretRef") or source.get("configMapRef") or {}
        values = (secrets_data if secret else configmaps).get(ref.get("name", ""))
        if values is None:
            if ref.get("optional"):
                continue
            kind = "Secret" if secret else "ConfigMap"
            raise ConfigError(f"container {name!r}: envFrom {kind} {ref.get('name')!r} was not sent with the pod "
                              "(interLink sends the objects the pod mounts as volumes)")  # fmt: skip
        for key, value in values.items():
            if offload.ENV_NAME.match(prefix + key):  # as Kubernetes does: keys that are no variable name are skipped
                put(prefix + key, value.decode())
    for env in container.get("env") or []:
        ref = env.get("valueFrom")
        if not ref or "value" in env:  # a value (resolved by the VK, or given) is the value
            put(env["name"], env.get("value") or "")
            continue
        if ref.get("configMapKeyRef"):
            key = ref["configMapKeyRef"]
            value = configmaps.get(key.get("name", ""), {}).get(key.get("key", ""))
        elif ref.get("secretKeyRef"):
            key = ref["secretKeyRef"]
            value = secrets_data.get(key.get("name", ""), {}).get(key.get("key", ""))
        else:
            raise ConfigError(f"container {name!r}: env {env['name']!r} comes from a field or resource reference "
                              "the Virtual Kubelet left unresolved: set SkipDownwardAPIResolution: true in its "
                              "configuration, or give the value")  # fmt: skip
        if value is None:
            if key.get("optional"):
                continue
            raise ConfigError(f"container {name!r}: env {env['name']!r}: key {key.get('key')!r} of "
                              f"{key.get('name')!r} did not arrive: the Virtual Kubelet resolves such references "
                              "only with SkipDownwardAPIResolution: true in its configuration (else interLink sends "
                              "only objects the pod mounts as volumes)")  # fmt: skip
        put(env["name"], value.decode())
    mounts = []
    prepare = []
    for mount in container.get("volumeMounts") or []:
        if mount.get("subPath") or mount.get("subPathExpr"):
            raise ConfigError(f"container {name!r}: volumeMounts with subPath are not supported; mount the volume's "
                              "directory")  # fmt: skip
        volume = _safe(mount["name"])
        if not re.fullmatch(r"/[A-Za-z0-9._/-]*", mount.get("mountPath", "")):
            raise ConfigError(f"container {name!r}: mountPath {mount.get('mountPath')!r} must be an absolute path of "
                              "letters, digits and ._-/")  # fmt: skip
        if volume not in volumes:
            raise ConfigError(f"container {name!r} mounts {volume!r}, which the pod does not declare")
        if _service_account(volumes[volume]) and not site.runtime.makes_mount_points and not cached:
            # Kubernetes mounts the token in every pod; on a site's own (read-only) image Charliecloud cannot make
            # its mount point, and nothing on an HPC node could reach the cluster's API with it anyway
            notes.append(f"offload: container {name!r}: the service account token is not mounted at "
                         f"{mount['mountPath']}: its image is the site's own, where {site.config.runtime} cannot "
                         "make a mount point (an image from offload's cache has it)")  # fmt: skip
            continue
        source = f"$d/volumes/{volume}"
        prepare.append(f'mkdir -p "{source}"')
        # readOnly where the runtime can (Charliecloud cannot: its binds are as writable as the directory)
        read_only = bool(mount.get("readOnly")) and site.runtime.read_only_binds
        mounts.append(offload.Mount(f"{_JOBDIR}/volumes/{volume}", mount["mountPath"], read_only))
    gpus = _needs(container)[2]
    run = site.container_command(argv, image=image, mounts=mounts, env_names=names,
                                 workdir=container.get("workingDir") or None, gpus=gpus)  # fmt: skip
    command = shlex.join(run.argv).replace(_JOBDIR, '"$d"')
    # this container's variables are set (secret ones from the driver's POD_SECRET_*), then every secret dropped
    body = "; ".join([*prepare, *exports, "drop_secrets", *run.prelude, f"exec {command}"])
    log = f'"$d/{log_file(name)}"'
    return f'( state {name} start; ( {body} ) > {log} 2>&1; rc=$?; state {name} exit "$rc"; exit "$rc" )'


# -- reading back -------------------------------------------------------------------------------------------


def parse_state(text: str) -> dict[str, dict[str, Any]]:
    """``pod-state`` lines -> container name -> {"started": epoch, "exit": code, "finished": epoch}."""
    found: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] == "start":
            found.setdefault(parts[0], {})["started"] = int(parts[2])
        elif len(parts) == 4 and parts[1] == "exit":
            entry = found.setdefault(parts[0], {})
            entry["exit"], entry["finished"] = int(parts[2]), int(parts[3])
    return found


def _time(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def container_statuses(names: list[str], images: dict[str, str], status: offload.JobStatus,
                       states: dict[str, dict[str, Any]]) -> list[dict]:  # fmt: skip
    """v1.ContainerStatus objects for ``names``, from the job's status and the driver's state file."""
    out = []
    end_code = _end_code(status)
    now = datetime.now(UTC).timestamp()
    for name in names:
        entry = states.get(name, {})
        state: dict[str, Any]
        if _kill_pending(entry, status, now):
            state = {"running": {"startedAt": _time(entry.get("started"))}}
        elif "exit" in entry:
            code = entry["exit"]
            state = {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                    "startedAt": _time(entry.get("started")),
                                    "finishedAt": _time(entry.get("finished"))}}  # fmt: skip
            if code == EXIT_CODES[offload.EndCause.OUT_OF_MEMORY] and status.cause is offload.EndCause.OUT_OF_MEMORY:
                # the kernel killed the container's process, and its driver lived to record it: Kubernetes' words
                state["terminated"].update(reason="OOMKilled", message=_end_words(status))
        elif status.state.is_terminal:
            # never started, or killed with the job: the job's end, as an exit code Kubernetes keeps
            # the VK overwrites "reason" with "Error: <code>": the words go in "message" too
            state = {"terminated": {"exitCode": end_code or 1, "reason": f"job {status.describe()}",
                                    "message": _end_words(status), "startedAt": _time(entry.get("started")),
                                    "finishedAt": _time(now)}}  # fmt: skip
        elif "started" in entry:
            state = {"running": {"startedAt": _time(entry["started"])}}
        else:
            pending = status.state is offload.JobState.PENDING and status.reason
            reason = status.reason if pending else "ContainerCreating"
            state = {"waiting": {"reason": reason, "message": status.describe()}}
        out.append({"name": name, "state": state, "ready": "running" in state, "restartCount": 0,
                    "image": images.get(name, ""), "imageID": "", "started": "running" in state})  # fmt: skip
    return out


def _kill_pending(entry: dict[str, Any], status: offload.JobStatus, now: float) -> bool:
    """The container's driver recorded a SIGKILL, its job still runs and the kill is recent: whether it was
    the scheduler's memory kill is known only once the job ends (:data:`KILLED_HOLD`)."""
    if entry.get("exit") != EXIT_CODES[offload.EndCause.OUT_OF_MEMORY] or status.state.is_terminal:
        return False
    return now - (entry.get("finished") or now) < KILLED_HOLD


def _end_words(status: offload.JobStatus) -> str:
    """A terminated container's message: why its job ended, the cause as data first (``OUT_OF_MEMORY``), then
    the scheduler's own words, which need not name it (``FAILED (JobLaunchFailure)``)."""
    words = status.describe()
    if status.cause is not None and status.cause.value not in words:
        words = f"{status.cause.value}: {words}"
    return words


def _end_code(status: offload.JobStatus) -> int:
    if status.state is offload.JobState.COMPLETED:
        return 0
    code = EXIT_CODES.get(status.cause if status.cause is not None else status.state)
    return code or status.exit_code or 1
