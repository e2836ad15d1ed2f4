"""The interLink plugin's translation and handlers, on the built-in local site (processes, no container):
what a pod becomes, what is refused before anything is submitted, and the HTTP contract end to end."""

from __future__ import annotations

import asyncio
import base64
import uuid

import pytest

pytest.importorskip("aiohttp")

from aiohttp.test_utils import TestClient, TestServer

import offload
from interlink_offload import PodServer, plan_pod, site_image
from interlink_offload.pods import container_statuses, parse_state
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


def pod(containers: list[dict], init: list[dict] | None = None, **spec: object) -> dict:
    meta = {"name": "p", "namespace": "default", "uid": str(uuid.uuid4()), **spec.pop("meta", {})}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": {"containers": containers, "initContainers": init, **spec}}  # fmt: skip


def sh(name: str, script: str, **more: object) -> dict:
    return {"name": name, "image": "busybox:1", "command": ["sh", "-c", script], **more}


def data(p: dict, secrets: list | None = None, configmaps: list | None = None) -> dict:
    every = [*(p["spec"].get("initContainers") or []), *p["spec"]["containers"]]
    return {"pod": p, "container": [{"name": c["name"], "configMaps": configmaps, "secrets": secrets,
                                     "projectedvolumemaps": None, "emptyDirs": None} for c in every]}  # fmt: skip


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


def test_a_pod_asks_for_what_kubernetes_would_count(site):
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


def test_secret_values_travel_as_secrets_not_in_the_script(site):
    token = {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}}
    p = pod([sh("main", "echo $TOKEN", env=[token])])
    job = plan_pod(site, data(p, [SECRET]), {"busybox:1": "busybox:1"})
    assert "t0k" not in site.job_script(job)
    assert list(job.secrets.values()) == ["t0k'$en"]


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
def test_what_offload_cannot_run_is_refused_with_what_to_change(site, change, words):
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


async def test_the_plugin_api_end_to_end_on_the_local_site(site):
    async with TestClient(TestServer(PodServer(site).app())) as client:
        assert await (await client.get("/status", json=[])).json() == []
        p = pod([sh("main", 'echo "main $TOKEN"; exit 3'), sh("side", "echo side")],
                init=[sh("first", "echo first"),
                      sh("second", "echo second", env=[{"name": "TOKEN", "value": "it's $HOME"}])],
                )  # fmt: skip
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
        stranger = pod([sh("main", "true")])
        assert (await client.post("/delete", json=stranger)).status == 200
        assert (await client.get("/status", json=[stranger])).status == 200
        bad = await client.post("/create", json=data(pod([{"name": "main", "image": "busybox:1"}])))
        assert bad.status == 422 and "command" in await bad.text()


def test_on_apptainer_each_container_is_one_apptainer_exec_with_its_binds_and_env(tmp_path, monkeypatch):
    """Apptainer has no package here: its path is checked by the exact command line the driver runs."""
    config = tmp_path / "sites.toml"
    config.write_text(f'[sites.ap]\ntransport = "local"\nscheduler = "local"\nruntime = "apptainer"\n'
                      f'workdir = "{tmp_path / "work"}"\n')  # fmt: skip
    monkeypatch.setenv("OFFLOAD_CONFIG", str(config))
    site = offload.load_site("ap")
    p = pod([{"name": "main", "image": "x", "command": ["python3", "app.py"], "env": [{"name": "A", "value": "1"}],
              "volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg", "readOnly": True}],
              "resources": {"limits": {"nvidia.com/gpu": 1}}}],
            volumes=[{"name": "cfg", "configMap": {"name": "c"}}])  # fmt: skip
    sent = data(p, configmaps=[{"metadata": {"name": "c"}, "data": {"k": "v"}}])
    driver = plan_pod(site, sent, {"x": "/images/x.sif"}).command[2]
    run = 'exec apptainer exec --cleanenv --nv --bind "$d"/volumes/cfg:/etc/cfg:ro /images/x.sif python3 app.py'
    assert run in driver
    assert 'export A=1; drop_secrets; export APPTAINERENV_A="${A}"' in driver
    site.close()


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
    async with TestClient(TestServer(PodServer(site).app())) as client:
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
            assert reply.status == 200 and await reply.json() == []
    server.cancel()
    with pytest.raises(asyncio.CancelledError):
        await server
