"""offload as an interLink plugin, driven the way interLink's API server and the Virtual Kubelet drive it:
``offload interlink serve`` runs as its own process, pods built from the real Kubernetes models (lightkube's)
are created, their status asked every few seconds one pod per request, pinged with an empty array, their logs
read with Tail and Follow, and deleted. The pods run on the test site in Charliecloud, image from the site's
registry (pulled once on the login node).

A pod's lifecycle (create, retried create, a restarted plugin, running, delete) and its status and logs run on
both of the site's schedulers (SLURM and Grid Engine): they show the plugin works on a scheduler. The other tests
stay on SLURM: what they test is the pod driver's and the image cache's (env, volumes, init containers, refusals,
ENTRYPOINT, read-only images), the same program whatever schedules the job, or SLURM's own (its memory enforcement,
$SLURM_* limits, GPU binding and vk.io flags, the squeue call log)."""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml
from lightkube.models.core_v1 import (
    ConfigMapEnvSource,
    ConfigMapKeySelector,
    ConfigMapProjection,
    ConfigMapVolumeSource,
    Container,
    EmptyDirVolumeSource,
    EnvFromSource,
    EnvVar,
    EnvVarSource,
    PodSpec,
    ProjectedVolumeSource,
    ResourceRequirements,
    SecretKeySelector,
    SecretProjection,
    SecretVolumeSource,
    Volume,
    VolumeMount,
    VolumeProjection,
)
from lightkube.models.core_v1 import Pod as PodModel
from lightkube.models.meta_v1 import ObjectMeta

from tests import leftovers
from tests.conftest import both_sites

from .conftest import STATE, queued_jobs, wait_until

EXAMPLE = Path(__file__).parents[2] / "examples" / "interlink" / "pod.yaml"

REGISTRY = os.environ.get("OFFLOAD_TESTSITE_REGISTRY", "10.231.77.1:5000")
IMAGE = f"{REGISTRY}/offload/test:1"  # as a pod names it: no scheme
SECRET_TOKEN = "s3cr3t-'quoted' $HOME `id`"
# The site's own image (root's, read-only to the cluster user, as a site's shared images are), by a pod name
SITE_IMAGE_NAME, SITE_IMAGE = "site/shared:1", "/var/lib/offload-testsite/images/default"


class Plugin:
    """``offload interlink serve`` in its own process, and the HTTP calls interLink makes to it."""

    def __init__(self, tmp: Path, site: str) -> None:
        self.tmp = tmp
        self.site = site
        self.port = _free_port()
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        log = open(self.tmp / f"plugin-{time.time_ns()}.log", "w")  # noqa: SIM115 (the process keeps it)
        argv = [sys.executable, "-m", "offload.cli", "interlink", "serve", "--site", self.site, "--listen",
                f"127.0.0.1:{self.port}", "--image-map", f"python:3.12-slim=docker://{IMAGE}",
                "--image-map", f"{SITE_IMAGE_NAME}={SITE_IMAGE}"]  # fmt: skip
        # the module's fixture owns the plugin, also when a test restarts it (tests/leftovers.py)
        env = {**os.environ, leftovers.FIXTURE_MARK: "interlink-plugin"}
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.log = Path(log.name)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"the plugin did not listen: {self.log.read_text()}")

    def stop(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(30) == 0, self.log.read_text()

    def call(self, method: str, path: str, body: object, timeout: float = 300) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=json.dumps(body), headers={"Content-Type": "application/json"})
            reply = conn.getresponse()
            return reply.status, reply.read().decode()
        finally:
            conn.close()

    def create(self, data: dict) -> dict:
        code, text = self.call("POST", "/create", data)
        assert code == 200, text
        return json.loads(text)

    def status(self, pod: dict) -> dict:
        code, text = self.call("GET", "/status", [pod], timeout=60)
        assert code == 200, text
        answers = json.loads(text)
        assert len(answers) == 1 and answers[0]["UID"] == pod["metadata"]["uid"], answers
        return answers[0]

    def wait(self, pod: dict, until: str = "terminated", timeout: float = 240) -> dict:
        """Ask for the pod's status every 2 s (as the Virtual Kubelet does, one pod per call) until every
        container is ``until``."""
        deadline = time.monotonic() + timeout
        while True:
            answer = self.status(pod)
            if all(until in c["state"] for c in answer["containers"]):
                return answer
            assert time.monotonic() < deadline, answer
            time.sleep(2)

    def logs(self, pod: dict, container: str, **opts: object) -> str:
        meta = pod["metadata"]
        body = {"Namespace": meta["namespace"], "PodUID": meta["uid"], "PodName": meta["name"],
                "ContainerName": container, "Opts": {"Tail": 0, "Bytes": 0, "Timestamps": False,
                                                     "Follow": False, "Previous": False, **opts}}  # fmt: skip
        code, text = self.call("GET", "/getLogs", body)
        assert code == 200, text
        return text

    def delete(self, pod: dict) -> None:
        code, text = self.call("POST", "/delete", pod)
        assert code == 200, text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def plugins(testsite_config, tmp_path_factory):
    """The plugin of each site, started when a test first asks for it; stopped at the module's end."""
    started: dict[str, Plugin] = {}

    def of(site: str) -> Plugin:
        if site not in started:
            started[site] = Plugin(tmp_path_factory.mktemp(f"interlink-{site}"), site)
        return started[site]

    yield of
    for plugin in started.values():
        plugin.stop()


@pytest.fixture
def plugin(plugins, site_name):
    return plugins(site_name)


KUBE_API_ACCESS = "kube-api-access-q9z7w"


def pod(name: str, containers: list[Container], *, init: list[Container] | None = None,
        volumes: list[Volume] | None = None, annotations: dict | None = None) -> dict:  # fmt: skip
    """A pod as the API server stores it: the ServiceAccount admission plugin has added the projected
    kube-api-access-* volume and mounted it into every container."""
    meta = ObjectMeta(name=name, namespace="default", uid=str(uuid.uuid4()), annotations=annotations)
    spec = PodSpec(containers=containers, initContainers=init, volumes=volumes, restartPolicy="Never")
    body = PodModel(apiVersion="v1", kind="Pod", metadata=meta, spec=spec).to_dict()
    access = {
        "name": KUBE_API_ACCESS,
        "projected": {
            "defaultMode": 420,
            "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
            ],
        },
    }
    body["spec"]["volumes"] = [*(body["spec"].get("volumes") or []), access]
    for c in [*(body["spec"].get("initContainers") or []), *body["spec"]["containers"]]:
        c["volumeMounts"] = [
            *(c.get("volumeMounts") or []),
            {"name": KUBE_API_ACCESS, "readOnly": True, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"},
        ]
    return body  # fmt: skip


def sh(name: str, script: str, **kwargs: object) -> Container:
    return Container(name=name, image=IMAGE, command=["sh", "-c", script], **kwargs)


CONFIGMAP = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings", "namespace": "default"},
             "data": {"mode": "fast & \"loud\"", "app.ini": "[app]\nlevel = 3\n"}}  # fmt: skip
SECRET = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds", "namespace": "default"},
          "type": "Opaque", "data": {"token": base64.b64encode(SECRET_TOKEN.encode()).decode()}}  # fmt: skip


def retrieved(pod: dict, configmaps: list | None = None, secrets: list | None = None) -> dict:
    """interLink's ``RetrievedPodData`` for ``pod``, built as the Virtual Kubelet and interLink build it: the unit
    tests' builder (tests/unit/test_interlink.py ``data``, each step naming the Go function it mirrors), with the
    VK's SkipDownwardAPIResolution on."""
    from tests.unit.test_interlink import data

    return data(pod, secrets, configmaps)


def code(answer: dict, name: str, kind: str = "containers") -> int:
    (status,) = [c for c in answer[kind] if c["name"] == name]
    return status["state"]["terminated"]["exitCode"]


def test_pods_run_as_jobs_with_env_volumes_init_containers_and_limits(plugin, site):
    code_, pong = plugin.call("GET", "/status", [])  # interLink's ping: a PingResponse with the site's capacity
    assert code_ == 200 and json.loads(pong)["status"] == "ok" and json.loads(pong)["resources"]["cpu"]

    hello = pod("hello", [sh("main", "echo hello from $(hostname)")])
    tricky = 'it\'s "$HOME" `id` $(id) \\ end'
    env = pod(
        "env-and-volumes",
        [
            sh(
                "main",
                'printf "%s|%s|%s|%s\\n" "$TRICKY" "$MODE" "$TOKEN" "$CFG_mode"; cat /etc/config/app.ini; '
                "cat /etc/secret/token; echo; stat -c %a /etc/secret/token; ls /etc/both; cat /scratch/from-init",
                env=[
                    EnvVar(name="TRICKY", value=tricky),
                    EnvVar(
                        name="MODE",
                        valueFrom=EnvVarSource(configMapKeyRef=ConfigMapKeySelector(name="settings", key="mode")),
                    ),
                    EnvVar(
                        name="TOKEN", valueFrom=EnvVarSource(secretKeyRef=SecretKeySelector(name="creds", key="token"))
                    ),
                ],
                envFrom=[EnvFromSource(prefix="CFG_", configMapRef=ConfigMapEnvSource(name="settings"))],
                volumeMounts=[
                    VolumeMount(name="config", mountPath="/etc/config"),
                    VolumeMount(name="secret", mountPath="/etc/secret", readOnly=True),
                    VolumeMount(name="both", mountPath="/etc/both"),
                    VolumeMount(name="scratch", mountPath="/scratch"),
                ],
            ),
        ],
        init=[
            sh(
                "prepare",
                "echo made by init > /scratch/from-init",
                volumeMounts=[VolumeMount(name="scratch", mountPath="/scratch")],
            )
        ],
        volumes=[
            Volume(name="config", configMap=ConfigMapVolumeSource(name="settings")),
            Volume(name="secret", secret=SecretVolumeSource(secretName="creds")),
            Volume(
                name="both",
                projected=ProjectedVolumeSource(
                    sources=[
                        VolumeProjection(configMap=ConfigMapProjection(name="settings")),
                        VolumeProjection(secret=SecretProjection(name="creds")),
                    ]
                ),
            ),
            Volume(name="scratch", emptyDir=EmptyDirVolumeSource()),
        ],
    )
    limits = pod("limits", [sh("main", 'echo "cpus=$SLURM_CPUS_PER_TASK mem=$SLURM_MEM_PER_NODE '
                                       'gpus=$CUDA_VISIBLE_DEVICES"',
                               resources=ResourceRequirements(limits={"cpu": "2", "memory": "256Mi",
                                                                      "nvidia.com/gpu": "1"}))])  # fmt: skip
    failing = pod("failing", [sh("main", "echo about to fail; exit 3")])
    init_fails = pod("init-fails", [sh("main", "echo never")], init=[sh("check", "echo no input >&2; exit 7")])
    pair = pod("pair", [sh("writer", "sleep 1; echo ready > /shared/flag",
                           volumeMounts=[VolumeMount(name="shared", mountPath="/shared")]),
                        sh("reader", "while [ ! -e /shared/flag ]; do sleep 0.2; done; cat /shared/flag",
                           volumeMounts=[VolumeMount(name="shared", mountPath="/shared")])],
               volumes=[Volume(name="shared", emptyDir=EmptyDirVolumeSource())])  # fmt: skip

    # from interLink's own test set: 200 MB under a 50 MB limit is killed, as a site's memory enforcement does
    hungry = pod("hungry", [sh("main", "python3 -c \"b = bytearray(200 << 20); b[::4096] = b'x' * len(b[::4096]); "
                                       "import time; time.sleep(30)\"",
                               resources=ResourceRequirements(limits={"memory": "50Mi"}))])  # fmt: skip

    pods = [hello, env, limits, failing, init_fails, pair, hungry]
    replies = {p["metadata"]["name"]: plugin.create(retrieved(p, [CONFIGMAP], [SECRET])) for p in pods}
    assert all(r["PodUID"] for r in replies.values())  # answered at once: the job id comes with /status
    answers = {p["metadata"]["name"]: plugin.wait(p) for p in pods}
    replies = {name: {"PodJID": answer["JID"]} for name, answer in answers.items()}

    assert code(answers["hello"], "main") == 0
    assert "hello from" in plugin.logs(hello, "main")

    assert code(answers["env-and-volumes"], "prepare", "initContainers") == 0
    assert code(answers["env-and-volumes"], "main") == 0
    out = plugin.logs(env, "main").splitlines()
    assert out[0] == f'{tricky}|fast & "loud"|{SECRET_TOKEN}|fast & "loud"'
    assert out[1:3] == ["[app]", "level = 3"]
    assert out[3] == SECRET_TOKEN and out[4] == "600"
    # the projected volume as the VK sends it: its ConfigMap sources only (it drops Secret sources)
    assert sorted(out[5:7]) == ["app.ini", "mode"]
    assert out[7] == "made by init"
    # the secret's value reached the container, but never the batch script
    job = site.job(replies["env-and-volumes"]["PodJID"])
    assert SECRET_TOKEN not in site.transport_run(["cat", f"{job.ref.jobdir}/job.sh"])
    # secret and projected files (the service account token) gone with the pod
    assert site.transport_run(["ls", f"{job.ref.jobdir}/volumes"]).split() == ["config", "scratch"]

    assert plugin.logs(limits, "main").strip() == "cpus=2 mem=256 gpus=0"
    assert code(answers["failing"], "main") == 3
    assert plugin.logs(failing, "main") == "about to fail\n"
    assert code(answers["init-fails"], "check", "initContainers") == 7
    assert code(answers["init-fails"], "main") != 0  # never started: the job's end, as a failure
    assert "no input" in plugin.logs(init_fails, "check") and plugin.logs(init_fails, "main") == ""
    assert code(answers["pair"], "writer") == 0 and code(answers["pair"], "reader") == 0
    assert plugin.logs(pair, "reader").strip() == "ready"
    (oom,) = answers["hungry"]["containers"]
    assert oom["state"]["terminated"]["exitCode"] == 137, oom  # Kubernetes' code for OOMKilled
    assert "OUT_OF_MEMORY" in oom["state"]["terminated"]["message"], oom


def test_bad_pods_are_refused_with_what_to_change_and_nothing_is_queued(plugin, site_user):
    cases = {
        "subpath": (
            pod(
                "subpath",
                [sh("main", "true", volumeMounts=[VolumeMount(name="v", mountPath="/v", subPath="x")])],
                volumes=[Volume(name="v", emptyDir=EmptyDirVolumeSource())],
            ),
            "subPath",
        ),
        # a site's own image: its ENTRYPOINT and CMD are not offload's to know (one of the cache's is: below)
        "no-command": (pod("no-command", [Container(name="main", image=SITE_IMAGE_NAME)]), "command"),
        "bad-flags": (
            pod("bad-flags", [sh("main", "true")], annotations={"slurm-job.vk.io/flags": "exclusive"}),
            "--exclusive",
        ),
        "missing-secret": (
            pod(
                "missing-secret",
                [
                    sh(
                        "main",
                        "true",
                        env=[
                            EnvVar(
                                name="T", valueFrom=EnvVarSource(secretKeyRef=SecretKeySelector(name="absent", key="k"))
                            )
                        ],
                    )
                ],
            ),
            "absent",
        ),
    }
    for name, (bad, words) in cases.items():
        code_, text = plugin.call("POST", "/create", retrieved(bad))
        assert code_ == 422 and words in text, (name, text)
        assert not queued_jobs(site_user, f"pod-{bad['metadata']['uid']}")
    # a missing tag: /create answered at once; the cache's words become the pod's failure, and nothing is queued
    missing = pod("missing-image", [Container(name="main", image=f"{REGISTRY}/offload/test:nope", command=["true"])])
    plugin.create(retrieved(missing))
    (status,) = plugin.wait(missing)["containers"]
    assert status["state"]["terminated"]["exitCode"] != 0 and "nope" in status["state"]["terminated"]["message"]
    assert not queued_jobs(site_user, f"pod-{missing['metadata']['uid']}")


@both_sites
def test_create_is_idempotent_survives_a_restart_and_delete_cancels(plugin, site_user):
    long = pod("long", [sh("main", "echo started; sleep 300")])
    plugin.create(retrieved(long))
    plugin.create(retrieved(long))  # the Virtual Kubelet retried: the same job
    first = plugin.wait(long, until="running")["JID"]
    plugin.stop()
    plugin.start()  # a new process: it knows the pod from the records
    plugin.create(retrieved(long))
    answer = plugin.wait(long, until="running")
    assert answer["JID"] == first and queued_jobs(site_user, f"pod-{long['metadata']['uid']}")
    assert len(queued_jobs(site_user, f"pod-{long['metadata']['uid']}")) == 1
    assert "started" in plugin.logs(long, "main")
    plugin.delete(long)
    assert not queued_jobs(site_user, f"pod-{long['metadata']['uid']}")
    assert code(plugin.wait(long), "main") == 143  # CANCELLED: the code Kubernetes keeps
    plugin.delete(long)  # again, and a pod the plugin never saw: both fine
    plugin.delete(pod("stranger", [sh("main", "true")]))


@both_sites
def test_logs_follow_until_the_container_ends_and_tail_keeps_the_last_lines(plugin):
    counting = pod("counting", [sh("main", "for i in 1 2 3 4 5; do echo line $i; sleep 1; done")])
    plugin.create(retrieved(counting))
    plugin.wait(counting, until="running")
    followed = plugin.logs(counting, "main", Follow=True)  # returns when the container ends
    assert followed.split() == [w for i in range(1, 6) for w in ("line", str(i))]
    assert plugin.logs(counting, "main", Tail=2) == "line 4\nline 5\n"
    assert plugin.logs(counting, "main", Bytes=4) == "line"
    assert code(plugin.wait(counting), "main") == 0


def test_twenty_live_pods_polled_every_five_seconds_cost_one_squeue_per_interval(plugin, site):
    pods = [pod(f"many-{i}", [sh("main", "sleep 120")]) for i in range(20)]
    for p in pods:
        plugin.create(retrieved(p))
    for p in pods:  # /create answers at once and submits in the background: the polling is measured after that
        wait_until(lambda p=p: plugin.status(p).get("JID"), timeout=120, what=f"the job of {p['metadata']['name']}")
    calls = STATE / "calls" / "squeue.log"
    errors: list[BaseException] = []

    def kubelet(p: dict) -> None:  # one pod per request, every 5 s, as the Virtual Kubelet does
        try:
            for _ in range(4):
                plugin.status(p)
                time.sleep(5)
        except BaseException as exc:
            errors.append(exc)

    start = time.time()
    threads = [threading.Thread(target=kubelet, args=(p,)) for p in pods]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.time() - start
    window = [float(t) for t in calls.read_text().split() if float(t) >= start]
    for p in pods:
        plugin.delete(p)
    assert not errors, errors
    interval = site.config.poll_interval
    assert len(window) <= took / interval + 2, f"{len(window)} squeue calls in {took:.0f} s for 20 pods"


def test_the_example_pod_runs_as_written(plugin):
    """examples/interlink/pod.yaml: its image mapped to the site's registry (--image-map), as an operator would."""
    configmap, example = yaml.safe_load_all(EXAMPLE.read_text())
    example["metadata"].update(namespace="default", uid=str(uuid.uuid4()))
    plugin.create(retrieved(example, [configmap]))  # pod.yaml has no kube-api-access volume: as kubectl sent it
    answer = plugin.wait(example)
    assert code(answer, "fetch", "initContainers") == 0 and code(answer, "train") == 0
    assert plugin.logs(example, "train").splitlines() == ["GPUs: 0", "epochs: 3", "data for run first"]


def push_with_entrypoint(tag: str, entrypoint: list[str], cmd: list[str]) -> str:
    """``offload/test:TAG`` in the site's registry: offload/test:1's layer with a config holding ENTRYPOINT and
    CMD, as ``docker build`` writes them (config.Entrypoint, config.Cmd), pushed as ``docker push`` does: the
    config blob by a monolithic upload (POST then PUT ?digest=, the OCI distribution spec), then the manifest."""
    import hashlib
    import urllib.request

    base = f"https://{REGISTRY}/v2/offload/test"
    kinds = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"

    def call(method: str, url: str, body: bytes | None = None, headers: dict | None = None):
        request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
        return urllib.request.urlopen(request, timeout=30)

    with call("GET", f"{base}/manifests/1", headers={"Accept": kinds}) as reply:
        manifest, media = json.loads(reply.read()), reply.headers["Content-Type"]
    with call("GET", f"{base}/blobs/{manifest['config']['digest']}") as reply:
        config = json.loads(reply.read())
    config.setdefault("config", {}).update(Entrypoint=entrypoint, Cmd=cmd)
    blob = json.dumps(config).encode()
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    with call("POST", f"{base}/blobs/uploads/", b"") as reply:
        location = reply.headers["Location"]
    location = location if location.startswith("https://") else f"https://{REGISTRY}{location}"
    sep = "&" if "?" in location else "?"
    call("PUT", f"{location}{sep}digest={digest}", blob, {"Content-Type": "application/octet-stream"}).close()
    manifest["config"].update(digest=digest, size=len(blob))
    call("PUT", f"{base}/manifests/{tag}", json.dumps(manifest).encode(), {"Content-Type": media}).close()
    return f"{REGISTRY}/offload/test:{tag}"


def test_a_container_without_command_runs_its_images_entrypoint_and_cmd(plugin):
    """Kubernetes' rule with an image whose config has ENTRYPOINT and CMD (read from the cache's record of it):
    neither given -> both; args -> ENTRYPOINT + args; command -> command alone."""
    image = push_with_entrypoint(f"entry-{uuid.uuid4().hex[:6]}", ["sh", "-c", 'echo "from-entrypoint $*"', "ep"],
                                 ["default-cmd"])  # fmt: skip
    pods = {
        "neither": pod("entry-neither", [Container(name="main", image=image)]),
        "args": pod("entry-args", [Container(name="main", image=image, args=["given", "two"])]),
        "command": pod("entry-command", [Container(name="main", image=image, command=["echo", "command-only"])]),
    }
    for p in pods.values():
        plugin.create(retrieved(p))
    answers = {name: plugin.wait(p) for name, p in pods.items()}
    assert all(code(a, "main") == 0 for a in answers.values()), answers
    assert plugin.logs(pods["neither"], "main") == "from-entrypoint default-cmd\n"
    assert plugin.logs(pods["args"], "main") == "from-entrypoint given two\n"
    assert plugin.logs(pods["command"], "main") == "command-only\n"


def test_init_containers_share_an_empty_dir_on_a_read_only_image(plugin):
    """On the site's own image (root's: the job may not add directories to it), an emptyDir is a writable
    directory of the job bound into each container; one whose mount point the image lacks stops with what to do,
    not with ch-run's "Read-only file system"."""
    shared = [VolumeMount(name="work", mountPath="/srv")]
    ok = pod("shared-srv", [Container(name="main", image=SITE_IMAGE_NAME, command=["cat", "/srv/made"],
                                      volumeMounts=shared)],
             init=[Container(name="first", image=SITE_IMAGE_NAME, command=["sh", "-c", "echo by-first > /srv/made"],
                             volumeMounts=shared),
                   Container(name="second", image=SITE_IMAGE_NAME, command=["sh", "-c", "echo by-second >> /srv/made"],
                             volumeMounts=shared)],
             volumes=[Volume(name="work", emptyDir=EmptyDirVolumeSource())])  # fmt: skip
    lacking = pod("no-mount-point", [Container(name="main", image=SITE_IMAGE_NAME, command=["true"],
                                               volumeMounts=[VolumeMount(name="work", mountPath="/offload-absent")])],
                  volumes=[Volume(name="work", emptyDir=EmptyDirVolumeSource())])  # fmt: skip
    plugin.create(retrieved(ok))
    plugin.create(retrieved(lacking))
    answer = plugin.wait(ok)
    assert code(answer, "first", "initContainers") == 0 and code(answer, "second", "initContainers") == 0, answer
    assert code(answer, "main") == 0 and plugin.logs(ok, "main") == "by-first\nby-second\n"
    assert code(plugin.wait(lacking), "main") == 1
    said = plugin.logs(lacking, "main")
    assert "has no directory /offload-absent" in said and "Read-only file system" not in said, said
