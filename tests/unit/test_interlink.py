"""The interLink plugin's translation and handlers, on the built-in local site (processes, no container):
what a pod becomes, what is refused before anything is submitted, and the HTTP contract end to end."""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import json
import tarfile
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("aiohttp")

from aiohttp.test_utils import TestClient, TestServer

import offload
from interlink_offload import PodServer, plan_pod, site_image
from interlink_offload.pods import KILLED_HOLD, container_statuses, parse_state
from interlink_offload.server import parse_listen


@pytest.fixture
def site(tmp_path, monkeypatch):
    config = tmp_path / "sites.toml"
    config.write_text(
        '[sites.here]\ntransport = "local"\nscheduler = "local"\nruntime = "none"\npull = "node"\n'
        f'poll_interval = 0.2\nworkdir = "{tmp_path / "work"}"\n'
    )
    monkeypatch.setenv("OFFLOAD_CONFIG", str(config))
    monkeypatch.setenv("OFFLOAD_STATE_DIR", str(tmp_path / "state"))
    site = offload.load_site("here")
    yield site
    site.close()


def planning_site(tmp_path, monkeypatch, runtime: str) -> offload.Site:
    """A local site whose runtime is ``runtime``: only planning runs on it (Apptainer has no package here)."""
    config = tmp_path / "sites.toml"
    config.write_text(f'[sites.{runtime}]\ntransport = "local"\nscheduler = "local"\nruntime = "{runtime}"\n'
                      f'workdir = "{tmp_path / "work"}"\n')  # fmt: skip
    monkeypatch.setenv("OFFLOAD_CONFIG", str(config))
    monkeypatch.setenv("OFFLOAD_STATE_DIR", str(tmp_path / "state"))
    return offload.load_site(runtime)


@pytest.fixture
def apptainer(tmp_path, monkeypatch):
    """A site whose runtime binds volumes."""
    site = planning_site(tmp_path, monkeypatch, "apptainer")
    yield site
    site.close()


KUBE_API_ACCESS = "kube-api-access-x7k2p"
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


def pod(containers: list[dict], init: list[dict] | None = None, automount: bool = True, **spec: object) -> dict:
    """A pod as the API server stores it: unless ``automountServiceAccountToken`` is false, Kubernetes'
    ServiceAccount admission plugin (plugin/pkg/admission/serviceaccount) adds the projected ``kube-api-access-*``
    volume (a token, the ``kube-root-ca.crt`` ConfigMap's ``ca.crt``, the namespace from the downward API) and
    mounts it read-only into every container."""
    meta = {"name": "p", "namespace": "default", "uid": str(uuid.uuid4()), **spec.pop("meta", {})}
    body = {"containers": containers, "initContainers": init, **spec}
    if automount:
        sources = [
            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace",
                                        "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
        ]  # fmt: skip
        access = {"name": KUBE_API_ACCESS, "projected": {"defaultMode": 420, "sources": sources}}
        body["volumes"] = [*(body.get("volumes") or []), access]
        for c in [*(init or []), *containers]:
            c["volumeMounts"] = [*(c.get("volumeMounts") or []),
                                 {"name": KUBE_API_ACCESS, "mountPath": SA_MOUNT, "readOnly": True}]  # fmt: skip
    else:
        body["automountServiceAccountToken"] = False
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": body}


def sh(name: str, script: str, **more: object) -> dict:
    return {"name": name, "image": "busybox:1", "command": ["sh", "-c", script], **more}


# What the cluster holds besides the pods: the Virtual Kubelet reads these from the API server.
ROOT_CA = {"metadata": {"name": "kube-root-ca.crt", "namespace": "default"}, "data": {"ca.crt": "-----BEGIN CERT"}}
SA_TOKEN = "eyJhbGciOi.sa-token"


def data(p: dict, secrets: list | None = None, configmaps: list | None = None, *,
         downward_api_resolution: bool = True) -> dict:  # fmt: skip
    """The ``RetrievedPodData`` interLink's API server POSTs to the plugin's /create for pod ``p``, given the
    cluster's Secrets and ConfigMaps, built the way the Virtual Kubelet and interLink build it (each step names
    the Go function it mirrors). ``downward_api_resolution`` is the VK's ``SkipDownwardAPIResolution`` setting
    (named the other way round in Go): only with it does the VK resolve ``env[].valueFrom``."""
    p = copy.deepcopy(p)
    spec = p["spec"]
    cluster_cms = {c["metadata"]["name"]: c for c in [ROOT_CA, *(configmaps or [])]}
    cluster_secrets = {s["metadata"]["name"]: s for s in secrets or []}
    # mirrors virtualkubelet.remoteExecutionHandleVolumes: a ConfigMap/Secret volume sends that object; each
    # projected volume becomes ONE ConfigMap named after the VOLUME, its keys the file paths
    # (remoteExecutionHandleProjectedSource: token, ConfigMap keys or items, downward API fieldRefs; it has no case
    # for Secret sources, so they are dropped); a downwardAPI volume becomes such a ConfigMap too and the pod's
    # volume is rewritten as a projected one
    request: dict = {"pod": p, "configmaps": None, "secrets": None, "projectedvolumesmaps": None}
    for volume in spec.get("volumes") or []:
        if "configMap" in volume:
            request["configmaps"] = [*(request["configmaps"] or []), cluster_cms[volume["configMap"]["name"]]]
        elif "secret" in volume:
            request["secrets"] = [*(request["secrets"] or []), cluster_secrets[volume["secret"]["secretName"]]]
        elif "projected" in volume or "downwardAPI" in volume:
            if "downwardAPI" in volume:
                volume["projected"] = {"sources": [{"downwardAPI": volume.pop("downwardAPI")}]}
            files: dict[str, str] = {}
            for source in volume["projected"]["sources"]:
                if "serviceAccountToken" in source:
                    files[source["serviceAccountToken"]["path"]] = SA_TOKEN
                elif "configMap" in source:
                    values = cluster_cms[source["configMap"]["name"]]["data"]
                    items = source["configMap"].get("items")
                    files.update({i["path"]: values[i["key"]] for i in items} if items else values)
                elif "downwardAPI" in source:
                    fields = {"metadata.namespace": p["metadata"]["namespace"], "metadata.name": p["metadata"]["name"],
                              "metadata.uid": p["metadata"]["uid"]}  # fmt: skip
                    items = source["downwardAPI"]["items"]
                    files.update({i["path"]: fields[i["fieldRef"]["fieldPath"]] for i in items})
            projected = {"metadata": {"name": volume["name"]}, "data": files}
            request["projectedvolumesmaps"] = [*(request["projectedvolumesmaps"] or []), projected]
    every = [*(spec.get("initContainers") or []), *spec["containers"]]
    for c in every:
        # mirrors virtualkubelet.resolveEnvFromRefs (always): envFrom becomes env values (explicit env wins; a
        # Secret's bytes as a string), envFrom is dropped
        explicit = {e["name"] for e in c.get("env") or []}
        for source in c.pop("envFrom", None) or []:
            if source.get("configMapRef"):
                values = dict(cluster_cms[source["configMapRef"]["name"]].get("data") or {})
            else:
                raw = cluster_secrets[source["secretRef"]["name"]]["data"]
                values = {k: base64.b64decode(v).decode() for k, v in raw.items()}
            for key, value in values.items():
                name = (source.get("prefix") or "") + key
                if name in explicit:
                    continue
                env = c.setdefault("env", [])
                env[:] = [e for e in env if e["name"] != name] + [{"name": name, "value": value}]
        # mirrors virtualkubelet.resolveEnvRefs (only with SkipDownwardAPIResolution): a key's value replaces
        # valueFrom; Go's omitempty drops an empty value
        for env in c.get("env") or [] if downward_api_resolution else []:
            ref = env.get("valueFrom") or {}
            if ref.get("secretKeyRef"):
                key = ref["secretKeyRef"]
                raw = (cluster_secrets.get(key["name"]) or {}).get("data", {}).get(key["key"])
                value = None if raw is None else base64.b64decode(raw).decode()
            elif ref.get("configMapKeyRef"):
                key = ref["configMapKeyRef"]
                value = (cluster_cms.get(key["name"]) or {}).get("data", {}).get(key["key"])
            else:
                continue
            if value is not None:
                env.pop("valueFrom")
                env.pop("value", None)
                if value:
                    env["value"] = value

    # mirrors interlink api getData + retrieveData: per container (init containers first), only the objects of the
    # volumes it mounts, matched by the ConfigMap's/Secret's name, a projected volume's by the volume's name; Go's
    # nil slices arrive as null
    def sent(c: dict) -> dict:
        out: dict = {"name": c["name"], "configMaps": None, "projectedvolumemaps": None, "secrets": None,
                     "emptyDirs": None}  # fmt: skip
        for mount in c.get("volumeMounts") or []:
            for volume in spec.get("volumes") or []:
                if volume["name"] != mount["name"]:
                    continue
                for kind, sent_as, wanted in (
                    ("configMap", "configmaps", (volume.get("configMap") or {}).get("name")),
                    ("projected", "projectedvolumesmaps", volume["name"]),
                    ("secret", "secrets", (volume.get("secret") or {}).get("secretName")),
                ):
                    if kind in volume:
                        found = [o for o in request[sent_as] or [] if o["metadata"]["name"] == wanted][:1]
                        field = {"configMap": "configMaps", "projected": "projectedvolumemaps"}.get(kind, "secrets")
                        out[field] = [*(out[field] or []), *found]
        return out

    return {"pod": p, "container": [sent(c) for c in every], "jobConfig": {}}


SECRET = {"metadata": {"name": "creds"}, "data": {"token": base64.b64encode(b"t0k'$en").decode()}}


def test_listen_addresses_stay_private_unless_asked():
    assert parse_listen("127.0.0.1:4000").port == 4000
    assert parse_listen("[::1]:4000").host == "::1"
    assert parse_listen("unix:///run/offload.sock").path == "/run/offload.sock"
    with pytest.raises(offload.ConfigError, match="--public"):
        parse_listen("0.0.0.0:4000")
    assert parse_listen("0.0.0.0:4000", public=True).host == "0.0.0.0"
    for bad in ("4000", "host:port", "unix://relative.sock"):
        with pytest.raises(offload.ConfigError):
            parse_listen(bad)


def test_pod_images_become_registry_references_unless_mapped():
    assert site_image("python:3.11", {}) == "docker://python:3.11"
    assert site_image("reg.example.org:5000/a/b:1", {}) == "docker://reg.example.org:5000/a/b:1"
    assert site_image("python:3.11", {"python:3.11": "/images/python.sqfs"}) == "/images/python.sqfs"
    assert site_image("/images/x.sif", {}) == "/images/x.sif"


def test_a_pod_asks_for_what_kubernetes_would_count(apptainer):
    site = apptainer
    two = pod([sh("a", "true", resources={"limits": {"cpu": "1", "memory": "512Mi"}}),
               sh("b", "true", resources={"requests": {"cpu": "1500m", "memory": "1Gi", "nvidia.com/gpu": 2}})],
              init=[sh("i", "true", resources={"limits": {"cpu": "8"}})],
              meta={"annotations": {"slurm-job.vk.io/flags": "--exclusive --qos=long"}})  # fmt: skip
    job = plan_pod(site, data(two), {"busybox:1": "busybox:1"})
    res = job.resources
    # the largest init container, or all containers together (1 + 2 cores, 512 MiB + 1 GiB)
    assert (res.cpus, res.memory, res.gpus) == (8, 1536, 2)
    assert res.extra == ("--exclusive", "--qos=long")
    assert job.name == f"pod-{two['metadata']['uid']}" and not job.container


def test_secret_values_travel_as_secrets_not_in_the_script(apptainer):
    site = apptainer
    token = {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}}
    p = pod([sh("main", "echo $TOKEN", env=[token])])
    job = plan_pod(site, data(p, [SECRET]), {"busybox:1": "busybox:1"})
    assert "t0k" not in site.job_script(job)
    assert list(job.secrets.values()) == ["t0k'$en"]


def _staged(job: offload.JobSpec) -> dict[str, tuple[bytes, int]]:
    """The files a pod's volumes put into the job's directory: path -> (bytes, mode)."""
    with tarfile.open(fileobj=io.BytesIO(job.files["volumes/"])) as tar:
        return {m.name: (tar.extractfile(m).read(), m.mode) for m in tar.getmembers() if m.isfile()}


def test_projected_volumes_arrive_as_one_configmap_named_after_the_volume(apptainer):
    """Every pod has the projected kube-api-access-* volume; the VK sends it as one ConfigMap named after the
    volume (a Secret source dropped), not as the kube-root-ca.crt ConfigMap its source names."""
    settings = {"metadata": {"name": "settings"}, "data": {"mode": "fast", "other": "x"}}
    p = pod([sh("main", "true", volumeMounts=[{"name": "both", "mountPath": "/etc/both"}])],
            volumes=[{"name": "both", "projected": {"sources": [
                {"configMap": {"name": "settings", "items": [{"key": "mode", "path": "conf/mode"}]}},
                {"secret": {"name": "creds"}}]}}])  # fmt: skip
    job = plan_pod(apptainer, data(p, [SECRET], [settings]), {"busybox:1": "busybox:1"})
    files = _staged(job)
    assert files[f"{KUBE_API_ACCESS}/token"] == (SA_TOKEN.encode(), 0o600)  # a credential: 0600, removed at the end
    assert files[f"{KUBE_API_ACCESS}/ca.crt"][0] == b"-----BEGIN CERT"
    assert files[f"{KUBE_API_ACCESS}/namespace"][0] == b"default"
    assert files["both/conf/mode"] == (b"fast", 0o600) and "both/other" not in files
    driver = job.command[2]
    assert f'"$d/volumes/{KUBE_API_ACCESS}"' in driver.split("trap", 1)[1].split("\n")[0]
    assert SA_TOKEN not in apptainer.job_script(job)


def test_env_values_are_secrets_and_need_no_object_sent_with_the_pod(apptainer):
    """The VK resolves envFrom (always) and valueFrom (with SkipDownwardAPIResolution) into env values, and
    interLink sends only the objects mounted as volumes: any value may be a Secret's, so none is in the script."""
    token = {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}}
    main = sh("main", "true", env=[token, {"name": "PLAIN", "value": "p1ain"}],
              envFrom=[{"secretRef": {"name": "creds"}, "prefix": "ALL_"}])  # fmt: skip
    job = plan_pod(apptainer, data(pod([main]), [SECRET]), {"busybox:1": "busybox:1"})
    script = apptainer.job_script(job)
    assert "t0k" not in script and "p1ain" not in script
    assert sorted(job.secrets.values()) == sorted(["t0k'$en", "p1ain", "t0k'$en"])
    # the VK's envFrom makes variables of every key, "app.ini" too: not one a shell can set, said in the job's output
    cfg = {"metadata": {"name": "cfg"}, "data": {"app.ini": "[x]"}}
    dotted = sh("main", "true", envFrom=[{"configMapRef": {"name": "cfg"}}])
    assert "app.ini'\"'\"' is no shell variable name" in plan_pod(apptainer, data(pod([dotted]), configmaps=[cfg]),
                                                            {"busybox:1": "busybox:1"}).command[2]  # fmt: skip
    # a value next to a reference the plugin cannot follow: the value counts
    both = sh("main", "true", env=[{**token, "value": "given"}])
    assert list(plan_pod(apptainer, data(pod([both])), {"busybox:1": "busybox:1"}).secrets.values()) == ["given"]
    # left unresolved (SkipDownwardAPIResolution off) and not mounted: the reply says which setting to change
    with pytest.raises(offload.ConfigError, match="SkipDownwardAPIResolution"):
        plan_pod(apptainer, data(pod([sh("main", "true", env=[token])]), [SECRET], downward_api_resolution=False),
                 {"busybox:1": "busybox:1"})  # fmt: skip


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"meta": {"annotations": {"slurm-job.vk.io/flags": "exclusive"}}}, "--exclusive"),
        ({"containers": [{"name": "main", "image": "busybox:1"}]}, "command"),
        (
            {
                "containers": [sh("main", "true", volumeMounts=[{"name": "v", "mountPath": "/v", "subPath": "x"}])],
                "volumes": [{"name": "v", "emptyDir": {}}],
            },
            "subPath",
        ),
        (
            {
                "containers": [sh("main", "true", volumeMounts=[{"name": "v", "mountPath": "/v"}])],
                "volumes": [{"name": "v", "hostPath": {"path": "/"}}],
            },
            "hostPath",
        ),
        (
            {
                "containers": [sh("main", "true", volumeMounts=[{"name": "v", "mountPath": "/v; rm"}])],
                "volumes": [{"name": "v", "emptyDir": {}}],
            },
            "mountPath",
        ),
        (
            {
                "containers": [
                    sh("main", "true", env=[{"name": "T", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k"}}}])
                ]
            },
            "'nope'",
        ),
        ({"containers": [sh("bad name", "true")]}, "Kubernetes name"),
    ],
)
def test_what_offload_cannot_run_is_refused_with_what_to_change(apptainer, change, words):
    site = apptainer
    containers = change.pop("containers", [sh("main", "true")])
    p = pod(containers, **change)
    with pytest.raises(offload.ConfigError, match=words):
        plan_pod(site, data(p), {"busybox:1": "busybox:1"})


def test_a_job_that_ended_early_gives_its_containers_a_code_kubernetes_keeps():
    timeout = offload.JobStatus(offload.JobState.TIMEOUT)
    states = parse_state("a start 100\na exit 0 101\nb start 100\n")
    a, b, c = container_statuses(["a", "b", "c"], {}, timeout, states)
    assert a["state"]["terminated"]["exitCode"] == 0
    assert b["state"]["terminated"]["exitCode"] == 124 and "TIMEOUT" in b["state"]["terminated"]["reason"]
    assert c["state"]["terminated"]["exitCode"] == 124
    pending = container_statuses(["a"], {}, offload.JobStatus(offload.JobState.PENDING, "Resources"), {})
    assert pending[0]["state"]["waiting"]["reason"] == "Resources"
    # the cause is data the scheduler plugin sets, whatever its words: OOMKilled's 137, a lost node's 255
    oom = offload.JobStatus(offload.JobState.FAILED, "JobLaunchFailure", None, "n1", 9, offload.EndCause.OUT_OF_MEMORY)
    lost = offload.JobStatus(offload.JobState.FAILED, "", None, "n1", None, offload.EndCause.NODE_FAILURE)
    failed = offload.JobStatus(offload.JobState.FAILED, "mentions OUT_OF_MEMORY in passing", 3)
    codes = [container_statuses(["a"], {}, s, {})[0]["state"]["terminated"]["exitCode"] for s in (oom, lost, failed)]
    assert codes == [137, 255, 3]
    ended = container_statuses(["a"], {}, oom, {})[0]["state"]["terminated"]
    assert ended["message"] == "OUT_OF_MEMORY: FAILED (JobLaunchFailure, signal 9)"


def test_a_container_the_kernel_killed_for_memory_is_oomkilled_when_its_driver_recorded_the_kill():
    """Seen on the site: the OOM killer took the container's process but not its driver, which wrote exit 137,
    and the job ended OUT_OF_MEMORY; the status must still say so (it said only "Error")."""
    states = parse_state("main start 100\nmain exit 137 101\n")
    oom = offload.JobStatus(offload.JobState.FAILED, "", 137, "n1", None, offload.EndCause.OUT_OF_MEMORY)
    (killed,) = container_statuses(["main"], {}, oom, states)
    assert killed["state"]["terminated"]["exitCode"] == 137
    assert killed["state"]["terminated"]["reason"] == "OOMKilled"
    assert "OUT_OF_MEMORY" in killed["state"]["terminated"]["message"]
    (plain,) = container_statuses(["main"], {}, offload.JobStatus(offload.JobState.FAILED, "", 137), states)
    assert plain["state"]["terminated"]["reason"] == "Error" and "message" not in plain["state"]["terminated"]


def test_a_killed_container_waits_for_its_jobs_end_before_it_is_terminated():
    """Seen on the site: a status asked between the driver's record of the kill and the scheduler's end of the
    job said "Error" with no cause, and the Virtual Kubelet asks no more once every container is terminated
    (``checkPodsStatus`` is skipped for a pod in a terminal phase): the kill shows only with the job's end."""
    now = int(time.time())  # the driver writes whole seconds (date +%s)
    running = offload.JobStatus(offload.JobState.RUNNING)
    states = parse_state(f"main start {now - 2}\nmain exit 137 {now - 1}\nside start {now - 2}\n")
    (main, side) = container_statuses(["main", "side"], {}, running, states)
    assert "running" in main["state"] and "running" in side["state"]
    oom = offload.JobStatus(offload.JobState.FAILED, "", 137, "n1", None, offload.EndCause.OUT_OF_MEMORY)
    assert container_statuses(["main"], {}, oom, states)[0]["state"]["terminated"]["reason"] == "OOMKilled"
    # a kill that did not end the job (another container goes on): the container ends once the hold is over
    old = parse_state(f"main start {now - 60}\nmain exit 137 {now - 1 - int(KILLED_HOLD)}\n")
    (killed,) = container_statuses(["main"], {}, running, old)
    assert killed["state"]["terminated"]["exitCode"] == 137 and killed["state"]["terminated"]["reason"] == "Error"
    # other exit codes end at once, as before
    (failed,) = container_statuses(["main"], {}, running, parse_state(f"main start {now}\nmain exit 3 {now}\n"))
    assert failed["state"]["terminated"]["exitCode"] == 3


async def test_the_plugin_api_end_to_end_on_the_local_site(site):
    async with TestClient(TestServer(PodServer(site).app())) as client:
        p = pod(
            [sh("main", 'echo "main $TOKEN"; exit 3'), sh("side", "echo side")],
            init=[
                sh("first", "echo first"),
                sh("second", "echo second", env=[{"name": "TOKEN", "value": "it's $HOME"}]),
            ],
            automount=False,
        )  # fmt: skip  (the local site runs no container: nothing to bind a volume into)
        p["spec"]["containers"][0]["env"] = [
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}}
        ]
        created = await (await client.post("/create", json=data(p, [SECRET]))).json()
        again = await (await client.post("/create", json=data(p, [SECRET]))).json()
        assert created == again and created["PodUID"] == p["metadata"]["uid"]
        for _ in range(100):
            (answer,) = await (await client.get("/status", json=[p])).json()
            if all("terminated" in c["state"] for c in answer["containers"]):
                break
            await asyncio.sleep(0.2)
        codes = {c["name"]: c["state"].get("terminated", c["state"]).get("exitCode") for c in answer["containers"]}
        assert codes == {"main": 3, "side": 0}, answer
        assert [c["state"]["terminated"]["exitCode"] for c in answer["initContainers"]] == [0, 0]

        async def logs(container: str, **opts: object) -> str:
            body = {"PodUID": p["metadata"]["uid"], "PodName": "p", "Namespace": "default",
                    "ContainerName": container, "Opts": opts}  # fmt: skip
            reply = await client.get("/getLogs", json=body)
            assert reply.status == 200, await reply.text()
            return await reply.text()

        assert await logs("main") == "main t0k'$en\n"
        assert await logs("second", Follow=True) == "second\n"
        assert await logs("side", Tail=1) == "side\n"
        stranger = pod([sh("main", "true")], automount=False)
        assert (await client.post("/delete", json=stranger)).status == 200
        assert (await client.get("/status", json=[stranger])).status == 200
        bad = await client.post("/create", json=data(pod([{"name": "main", "image": "busybox:1"}])))
        assert bad.status == 422 and "command" in await bad.text()


@pytest.mark.parametrize(
    ("given", "runs"),
    [
        ({}, "/entry -v default"),  # the image's ENTRYPOINT and CMD
        ({"args": ["mine"]}, "/entry -v mine"),  # args replace CMD
        ({"command": ["python3"]}, "python3"),  # command replaces ENTRYPOINT, and CMD goes with it
        ({"command": ["python3"], "args": ["app.py"]}, "python3 app.py"),
    ],
    ids=["neither", "args", "command", "both"],
)
def test_command_and_args_meet_the_images_entrypoint_and_cmd_as_in_kubernetes(apptainer, given, runs):
    p = pod([{"name": "main", "image": "x", **given}], automount=False)
    commands = {"x": (("/entry", "-v"), ("default",))}
    driver = plan_pod(apptainer, data(p), {"x": "/images/x.sif"}, commands).command[2]
    assert f"exec apptainer exec --cleanenv /images/x.sif {runs} ) > " in driver


def test_a_container_with_no_command_and_nothing_to_run_is_refused_with_why(apptainer):
    p = pod([{"name": "main", "image": "x"}], automount=False)
    with pytest.raises(offload.ConfigError, match="image 'x' has no ENTRYPOINT or CMD.*Give 'command'"):
        plan_pod(apptainer, data(p), {"x": "/images/x.sif"}, {"x": ((), ())})
    with pytest.raises(offload.ConfigError, match="does not know the ENTRYPOINT and CMD of its image 'x'.*a path on"):
        plan_pod(apptainer, data(p), {"x": "/images/x.sif"})  # not from offload's cache: its config is unknown


def test_on_apptainer_each_container_is_one_apptainer_exec_with_its_binds_and_env(apptainer):
    """Apptainer has no package here: its path is checked by the exact command line the driver runs."""
    p = pod([{"name": "main", "image": "x", "command": ["python3", "app.py"], "env": [{"name": "A", "value": "1"}],
              "volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg", "readOnly": True}],
              "resources": {"limits": {"nvidia.com/gpu": 1}}}],
            volumes=[{"name": "cfg", "configMap": {"name": "c"}}])  # fmt: skip
    sent = data(p, configmaps=[{"metadata": {"name": "c"}, "data": {"k": "v"}}])
    driver = plan_pod(apptainer, sent, {"x": "/images/x.sif"}).command[2]
    run = ('exec apptainer exec --cleanenv --nv --bind "$d"/volumes/cfg:/etc/cfg:ro --bind '
           f'"$d"/volumes/{KUBE_API_ACCESS}:{SA_MOUNT}:ro /images/x.sif python3 app.py')  # fmt: skip
    assert run in driver
    # every env value comes from the secrets file: the VK has already put Secret values into env[].value
    assert 'export A="${POD_SECRET_0_0}"; drop_secrets; export APPTAINERENV_A="${A}"' in driver


async def test_a_site_that_cannot_be_reached_is_the_replys_words(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    config = tmp_path / "sites.toml"
    config.write_text(f'[sites.gone]\nhost = "127.0.0.1"\nport = {port}\nuser = "x"\nconnect_timeout = 2\n')
    monkeypatch.setenv("OFFLOAD_CONFIG", str(config))
    monkeypatch.setenv("OFFLOAD_STATE_DIR", str(tmp_path / "state"))
    site = offload.load_site("gone")
    server = PodServer(site)
    server.retry_within = 1.0  # asked again once, then the reply says so
    async with TestClient(TestServer(server.app())) as client:
        reply = await client.get("/status", json=[pod([sh("main", "true")])])
        assert reply.status == 503 and "cannot reach" in await reply.text()
    await site.aclose()


async def test_serve_listens_on_a_unix_socket(site, tmp_path):
    import aiohttp

    from interlink_offload import serve

    path = tmp_path / "plugin.sock"
    ready = asyncio.Event()
    server = asyncio.ensure_future(serve(site, f"unix://{path}", ready=ready))
    await asyncio.wait_for(ready.wait(), 30)
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as session:
        async with session.get("http://plugin/status", json=[]) as reply:
            assert reply.status == 200 and (await reply.json())["status"] == "ok"
    server.cancel()
    with pytest.raises(asyncio.CancelledError):
        await server


# -- the plugin API as interLink's Go client calls it -------------------------------------------------------------


async def _status(client: TestClient, p: dict) -> dict:
    # mirrors interlink api StatusHandler -> sidecar: GET /status, a JSON array of pods, Content-Type JSON
    reply = await client.get("/status", json=[p])
    assert reply.status == 200, await reply.text()
    (answer,) = await reply.json()
    return answer


async def _until(client: TestClient, p: dict, state: str) -> dict:
    for _ in range(150):
        answer = await _status(client, p)
        if all(state in c["state"] for c in answer["containers"]):
            return answer
        await asyncio.sleep(0.1)
    raise AssertionError(answer)


@pytest.fixture
def slow_pull(monkeypatch):
    """The site's image cache, held at its pull until the test lets it go (a cold pull takes minutes)."""
    release, calls = asyncio.Event(), []
    real = offload.images.Images.acached  # what aresolve asks too

    async def acached(self, image, progress=None):
        calls.append(image)
        await release.wait()
        if isinstance(release.failure, BaseException):
            raise release.failure
        return await real(self, image, progress)

    release.failure = None
    monkeypatch.setattr(offload.images.Images, "acached", acached)
    return release


async def test_create_answers_at_once_and_the_pull_happens_in_the_background(site, slow_pull):
    async with TestClient(TestServer(PodServer(site).app())) as client:
        p = pod([sh("main", "echo pulled")], automount=False)
        reply = await asyncio.wait_for(client.post("/create", json=data(p)), 5)  # interLink waits 120 s at most
        assert reply.status == 200 and (await reply.json())["PodUID"] == p["metadata"]["uid"]
        waiting = await _status(client, p)
        assert waiting["containers"][0]["state"]["waiting"]["reason"] == "ContainerCreating"
        slow_pull.set()
        assert (await _until(client, p, "terminated"))["containers"][0]["state"]["terminated"]["exitCode"] == 0


async def test_a_failed_pull_is_the_pods_failure_and_no_job_is_left(site, slow_pull):
    async with TestClient(TestServer(PodServer(site).app())) as client:
        p = pod([sh("main", "true")], init=[sh("first", "true")], automount=False)
        assert (await client.post("/create", json=data(p))).status == 200
        slow_pull.failure = offload.ImageError("manifest unknown: busybox:nope")
        slow_pull.set()
        answer = await _until(client, p, "terminated")
        for c in [*answer["containers"], *answer["initContainers"]]:
            assert (
                c["state"]["terminated"]["exitCode"] != 0 and "manifest unknown" in c["state"]["terminated"]["message"]
            )
        assert not site.records(f"pod-{p['metadata']['uid']}") and not await site.afind(f"pod-{p['metadata']['uid']}")


async def test_delete_during_a_slow_create_submits_nothing(site, slow_pull):
    async with TestClient(TestServer(PodServer(site).app())) as client:
        p = pod([sh("main", "sleep 30")], automount=False)
        # the VK sends /create and /delete from two goroutines: the delete may come while the pull is on
        create = asyncio.ensure_future(client.post("/create", json=data(p)))
        await asyncio.sleep(0.3)
        assert (await client.post("/delete", json=p)).status == 200
        slow_pull.set()
        assert (await create).status == 200
        await asyncio.sleep(1.0)
        name = f"pod-{p['metadata']['uid']}"
        assert not site.records(name) and not await site.afind(name), "a job for a deleted pod"
        answer = await _status(client, p)
        assert answer["containers"][0]["state"]["terminated"]["exitCode"] == 143


async def test_a_container_with_no_command_runs_what_its_cached_image_says(site, monkeypatch):
    """/create cannot know a cached image's ENTRYPOINT before the pull, so it takes the pod; the job runs what the
    cache's record says. A site path's config is never known: such a pod is refused at once."""
    record = offload.CachedImage("local://app", "sha256:" + "a" * 64, "/", 1, 0.0, 0.0, ("sh", "-c", 'echo "$0"'),
                                 ("from-the-image",))  # fmt: skip

    async def acached(self, image, progress=None):
        return record if image == "app" else None

    monkeypatch.setattr(offload.images.Images, "acached", acached)
    async with TestClient(TestServer(PodServer(site, {"app:1": "app"}).app())) as client:  # a pushed image
        p = pod([{"name": "main", "image": "app:1"}], automount=False)
        assert (await client.post("/create", json=data(p))).status == 200
        assert (await _until(client, p, "terminated"))["containers"][0]["state"]["terminated"]["exitCode"] == 0
        body = {"PodUID": p["metadata"]["uid"], "PodName": "p", "Namespace": "default", "ContainerName": "main",
                "Opts": {}}  # fmt: skip
        assert await (await client.get("/getLogs", json=body)).text() == "from-the-image\n"
        on_site = pod([{"name": "main", "image": "/sw/img.sif"}], automount=False)
        refused = await client.post("/create", json=data(on_site))
        assert refused.status == 422 and "a path on the site has not" in await refused.text()


async def test_a_site_that_hiccups_is_asked_again_before_the_reply_fails(site, monkeypatch):
    async with TestClient(TestServer(PodServer(site).app())) as client:
        p = pod([sh("main", "sleep 2")], automount=False)
        assert (await client.post("/create", json=data(p))).status == 200
        await _until(client, p, "running")
        real, failures = offload.Job.astatus, [offload.SiteNotAnswering("squeue did not answer within 30 s")]

        async def astatus(self, refresh=True):
            if failures:
                raise failures.pop()
            return await real(self, refresh=refresh)

        monkeypatch.setattr(offload.Job, "astatus", astatus)
        assert (await client.get("/status", json=[p])).status == 200  # not a 503 that fails the pod for good
        assert not failures


async def test_the_ping_reports_the_sites_free_capacity(site, monkeypatch):
    from offload import NodeResources

    async def anodes():
        return [NodeResources("gpu1", ("gpu",), "mix", 4, 1, 64, 16, 256000, 56000),
                NodeResources("gpu2", ("gpu",), "idle", 4, 0, 64, 0, 256000, 0),
                NodeResources("down1", ("gpu",), "down", 4, 0, 64, 0, 256000, 0)]  # fmt: skip

    monkeypatch.setattr(site, "anodes", anodes)
    async with TestClient(TestServer(PodServer(site).app())) as client:
        # mirrors interlink api Ping: GET /status with the body "[]" (an empty []*v1.Pod), Content-Type JSON;
        # the VK parses the reply as a PingResponse (virtualkubelet.go, updateNodeResources)
        reply = await client.get("/status", data=b"[]", headers={"Content-Type": "application/json"})
        gpus = [{"resourceType": "nvidia.com/gpu", "available": "7"}]
        resources = {"cpu": "112", "memory": "456000Mi", "accelerators": gpus}
        assert await reply.json() == {"status": "ok", "resources": resources}


async def test_a_followed_silent_container_gets_no_keepalive_bytes(site, monkeypatch):
    import interlink_offload.server as server_module

    monkeypatch.setattr(server_module, "HEARTBEAT_SECONDS", 0.1, raising=False)
    async with TestClient(TestServer(PodServer(site).app())) as client:
        p = pod([sh("main", "echo one; sleep 2; echo two")], automount=False)
        await client.post("/create", json=data(p))
        await _until(client, p, "running")
        body = {"PodUID": p["metadata"]["uid"], "PodName": "p", "Namespace": "default", "ContainerName": "main",
                "Opts": {"Follow": True}}  # fmt: skip
        reply = await client.get("/getLogs", json=body)
        assert await reply.text() == "one\ntwo\n"  # kubectl logs -f shows every byte interLink forwards


async def test_a_followed_log_ends_at_its_byte_limit_while_the_container_goes_on(site):
    async with TestClient(TestServer(PodServer(site).app())) as client:
        p = pod([sh("main", "echo 0123456789; sleep 30")], automount=False)
        await client.post("/create", json=data(p))
        await _until(client, p, "running")
        body = {"PodUID": p["metadata"]["uid"], "PodName": "p", "Namespace": "default", "ContainerName": "main",
                "Opts": {"Follow": True, "LimitBytes": 4}}  # fmt: skip
        reply = await asyncio.wait_for(client.get("/getLogs", json=body), 10)
        assert await asyncio.wait_for(reply.text(), 10) == "0123"  # not held open until the container ends
        await client.post("/delete", json=p)


async def test_requests_a_web_page_could_send_are_refused(site, tmp_path):
    p = pod([sh("main", "true")], automount=False)
    async with TestClient(TestServer(PodServer(site).app())) as client:
        # a form or fetch from a page: text/plain needs no preflight, and the browser adds Origin
        forged = await client.post("/create", data=json.dumps(data(p)), headers={"Content-Type": "text/plain"})
        assert forged.status == 415
        with_origin = await client.post("/create", json=data(p), headers={"Origin": "http://evil.example"})
        assert with_origin.status == 403
        rebound = await client.post("/create", json=data(p), headers={"Host": "evil.example:4000"})
        assert rebound.status == 421
        # what interLink's Go client sends (ReqWithError: Content-Type JSON, InterLink-Http-Session; no Origin)
        real = await client.post("/create", json=data(p), headers={"InterLink-Http-Session": "CreatePod#1"})
        assert real.status == 200
    token = PodServer(site, token="s3cret")
    async with TestClient(TestServer(token.app())) as client:
        assert (await client.get("/status", json=[])).status == 401
        wrong = await client.get("/status", json=[], headers={"Authorization": "Bearer nope"})
        assert wrong.status == 401
        right = await client.get("/status", json=[], headers={"Authorization": "Bearer s3cret"})
        assert right.status == 200


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b"{not json", 400, "not JSON"),
        (b"[{}, {}]", 400, "one pod"),
        (b'"a string"', 400, "JSON object"),
        (b'{"pod": {"metadata": {"name": "p"}, "spec": {"containers": []}}}', 400, "uid"),
        (b'{"pod": "p"}', 400, "metadata and spec"),
        (b'{"pod": {"metadata": {"uid": "u1"}, "spec": {"containers": [{"image": "x"}]}}}', 400, "name"),
        (b'{"pod": {"metadata": {"uid": "u2"}, "spec": {"containers": "main"}}}', 400, "list of containers"),
        (
            b'{"pod": {"metadata": {"uid": "u3"}, "spec": {"containers": [{"name": "m", "image": "x"}]}}}',
            422,
            "command",
        ),
    ],
)
async def test_malformed_pods_get_the_reason_and_leave_nothing_behind(site, body, status, words):
    """Any reply but 200 fails the pod for good (virtualkubelet handleRemoteExecutionFailure), with the body as
    its message: the code says whose fault it is, the words what to change."""
    server = PodServer(site)
    async with TestClient(TestServer(server.app())) as client:
        reply = await client.post("/create", data=body, headers={"Content-Type": "application/json"})
        assert reply.status == status and words in await reply.text()
        answer = await client.get("/status", data=b'[{"metadata": {"uid": "u9"}}]',
                                  headers={"Content-Type": "application/json"})  # fmt: skip
        assert answer.status == 400
    assert not server._locks and not server._pending


def test_the_token_file_is_read_once_and_an_empty_one_is_refused(tmp_path):
    from interlink_offload.server import read_token

    (tmp_path / "token").write_text("s3cret\n")
    assert read_token(tmp_path / "token") == "s3cret"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(offload.ConfigError, match="empty"):
        read_token(tmp_path / "empty")
    with pytest.raises(offload.ConfigError, match="readable"):
        read_token(tmp_path / "absent")


async def test_logs_with_tail_or_limit_read_only_the_end_or_the_start():
    """`kubectl logs --tail=1` of a 300 MiB log read all of it (916 MiB more in the plugin): now only the end."""
    from interlink_offload.server import _read_shown

    log = b"".join(b"line %d\n" % i for i in range(2_000_000))  # about 25 MiB

    class Job:
        asked: list[tuple[int, int | None]] = []

        async def aget(self, name, offset=0, size=None):
            self.asked.append((offset, size))
            data = log[offset:]  # a negative offset: that many bytes from the end, as the transports read
            return data if size is None else data[:size]

    job = Job()
    assert await _read_shown(job, "main.log", 2, 0) == b"line 1999998\nline 1999999\n"
    assert all(offset < 0 and -offset <= 64 * 1024 for offset, _ in job.asked)
    job.asked.clear()
    assert await _read_shown(job, "main.log", 0, 12) == b"line 0\nline "
    assert job.asked == [(0, 12)]


async def test_deleting_a_pod_removes_its_volumes_even_if_its_driver_never_ran(site):
    """A pod cancelled while it queued never ran its driver, whose EXIT trap removes the secret files: the
    deletion removes the pod's volumes itself (here: the job ended, and its secret is back as if never removed)."""
    async with TestClient(TestServer(PodServer(site).app())) as client:
        # (the local site runs no container to bind a volume into: the secret volume is put in place below)
        p = pod([sh("main", "true")], automount=False)
        assert (await client.post("/create", json=data(p))).status == 200
        for _ in range(100):
            (answer,) = await (await client.get("/status", json=[p])).json()
            if answer.get("JID") and all("terminated" in c["state"] for c in answer["containers"]):
                break
            await asyncio.sleep(0.2)
        job = site.job(answer["JID"])
        left = Path(job.ref.jobdir) / "volumes" / "creds"
        left.mkdir(parents=True, exist_ok=True)
        (left / "token").write_text("t0k'$en")  # as a driver that never ran would have left it
        assert (await client.post("/delete", json=p)).status == 200
        assert not (Path(job.ref.jobdir) / "volumes").exists()
        assert (Path(job.ref.jobdir) / "output").exists()  # the job's own files stay


def test_on_a_sites_read_only_image_charliecloud_runs_the_pod_without_the_token_mount(tmp_path, monkeypatch):
    """Every pod has the service account token mounted; Charliecloud cannot make its mount point in a site's own
    image (a root-owned directory), so there it is left out, said in the job's output; an image of offload's
    cache (the user's) gets it."""
    site = planning_site(tmp_path, monkeypatch, "charliecloud")
    try:
        p = pod([sh("main", "true")])
        images = {"busybox:1": "/site/images/busybox"}
        own = "\n".join(plan_pod(site, data(p), images).command)
        assert SA_MOUNT not in own.replace(f"{SA_MOUNT}: its image", "") and "token is not mounted" in own
        cached = "\n".join(plan_pod(site, data(p), images, {"busybox:1": (["sh"], [])}).command)
        assert f":{SA_MOUNT}" in cached and "token is not mounted" not in cached
    finally:
        site.close()
