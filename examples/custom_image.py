"""Your own image on a site: your code baked into a base image here, pushed over SSH, run by a job and a Dask worker.

Many sites' compute nodes reach no registry, and your image may exist only on your machine. This takes a base
root file system with Python and distributed (a directory or a rootfs tarball), adds `myapp.py` to it, pushes
the result to the site's image cache as NAME (an image the site has already is not sent again; an interrupted
push carries on where it stopped), and runs a job and a Dask worker in it:

    python examples/custom_image.py --site testsite --base /var/lib/offload-testsite/images/default
    python examples/custom_image.py --site mysite --base ./rootfs.tar.gz --name myapp

(`offload image push` itself also takes `docker save` and OCI archives, and `.sif` files.)
"""

from __future__ import annotations

import argparse
import io
import tarfile
import tempfile
from pathlib import Path

from distributed import Client

import offload
from dask_offload import OffloadCluster

APP = '''
def answer(x):
    """Code that lives in the image, not in the client: workers import it."""
    return x * 2

if __name__ == "__main__":
    print("myapp in the image says", answer(21))
'''


def with_app(base: Path, target: Path) -> Path:
    """A rootfs tarball: the base image plus /opt/myapp/myapp.py."""
    with tarfile.open(target, "w:gz", compresslevel=1) as tar:
        if base.is_dir():
            tar.add(base.resolve(), arcname=".", filter=lambda m: None if m.isdev() else m)
        else:  # a rootfs tarball, copied member by member
            with tarfile.open(base) as source:
                for member in source.getmembers():
                    if not member.isdev():
                        tar.addfile(member, source.extractfile(member) if member.isfile() else None)
        data = APP.encode()
        info = tarfile.TarInfo("./opt/myapp/myapp.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", default=None)
    parser.add_argument("--base", required=True, help="A root file system (directory or tarball) with python3.")
    parser.add_argument("--name", default="myapp-image")
    args = parser.parse_args()

    site = offload.load_site(args.site)
    with tempfile.TemporaryDirectory() as tmp:
        image = site.images.push(with_app(Path(args.base), Path(tmp) / "image.tar.gz"), args.name, progress=print)
    print(f"pushed {image.name}: {image.digest[:19]}, {image.size / 2**20:.0f} MiB on the site")

    job = site.submit(offload.JobSpec(["python3", "/opt/myapp/myapp.py"], image=args.name))
    job.wait(timeout=300, check=True)
    print("job:", job.output().decode().strip())

    env = {"PYTHONPATH": "/opt/myapp"}
    with OffloadCluster(site=args.site, image=args.name, n_workers=1, memory="1GiB", env=env) as cluster:
        with Client(cluster) as client:
            client.wait_for_workers(1, timeout=300)

            def from_the_image(x: int) -> int:
                import myapp  # importable on the worker only: it is in the image

                return myapp.answer(x)

            print("dask worker:", client.submit(from_the_image, 21).result())


if __name__ == "__main__":
    main()
