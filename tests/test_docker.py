"""The Docker image, built here with buildah and started on a tiny model (slow; opt in with TOKENMILL_TEST_DOCKER=1).

No registry can be reached from these machines, so the base image is made locally: Debian bookworm
by debootstrap, with python3 and its venv module. torch is the CPU wheel this machine holds, lent to
the build through a mounted folder; everything else comes from PyPI as in any build.
"""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, wait_healthy

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("TOKENMILL_TEST_DOCKER") != "1", reason="set TOKENMILL_TEST_DOCKER=1 to build the image"),
    pytest.mark.skipif(not (shutil.which("buildah") and shutil.which("debootstrap")), reason="needs buildah and debootstrap (Debian packages)"),
]
ROOT = Path(__file__).resolve().parent.parent
BASE = "localhost/tokenmill-base:bookworm"
IMAGE = "localhost/tokenmill:test"
WHEELS = Path(os.environ.get("TOKENMILL_TEST_WHEELS", "/opt/wheels"))  # holds the CPU torch wheel (torch-*+cpu-cp311-*.whl)
BUILDAH = ["buildah", "--storage-driver", "vfs"]


def buildah(*args: str, timeout: float = 1800) -> str:
    result = subprocess.run([*BUILDAH, *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"buildah {' '.join(args[:3])} failed:\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """Debian bookworm with python3 (3.11, matching the local torch wheel) and venv, as a local image."""
    if buildah("images", "--quiet", "--filter", f"reference={BASE}").strip():
        return BASE
    rootfs = tmp_path_factory.mktemp("rootfs")
    subprocess.run(
        ["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm", str(rootfs), "http://deb.debian.org/debian"],
        check=True,
        capture_output=True,
        timeout=1800,
    )
    subprocess.run(["rm", "-rf", str(rootfs / "var/cache/apt/archives"), str(rootfs / "var/lib/apt/lists")], check=True)
    # This machine reaches PyPI through a proxy whose CA only the host's bundle holds: the base trusts what the host trusts.
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", rootfs / "etc/ssl/certs/ca-certificates.crt")
    container = buildah("from", "scratch").strip()
    buildah("copy", container, str(rootfs), "/")
    buildah("config", "--env", "PIP_CERT=/etc/ssl/certs/ca-certificates.crt", container)
    buildah("commit", "--rm", container, BASE)
    return BASE


@pytest.fixture(scope="module")
def image(base) -> dict:
    """The repository's Dockerfile, built on the local base: its build time and size."""
    wheel = next(WHEELS.glob("torch-*+cpu-cp311-*.whl"), None)
    if wheel is None:
        pytest.skip(f"no CPU torch wheel for Python 3.11 in {WHEELS}")
    started = time.monotonic()
    buildah(
        "bud",
        "--isolation",
        "chroot",
        "--layers=false",
        "--volume",
        f"{WHEELS}:/wheels:ro",
        "--build-arg",
        f"BASE_IMAGE={base}",
        "--build-arg",
        f"TORCH=/wheels/{wheel.name}",
        "-t",
        IMAGE,
        str(ROOT),
    )
    seconds = time.monotonic() - started
    [info] = json.loads(buildah("images", "--json", IMAGE))
    return {"seconds": seconds, "size": info["size"], "config": json.loads(buildah("inspect", "--type", "image", IMAGE))["OCIv1"]["config"]}


def test_the_image_keeps_its_contract(image):
    config = image["config"]
    assert config["User"] == "1000" and "/models" in config["Volumes"] and "8000/tcp" in config["ExposedPorts"]
    assert config["Entrypoint"][:2] == ["tokenmill", "serve"]
    print(f"\nbuilt in {image['seconds']:.0f} s; {image['size']}")


def test_no_build_tools_or_caches_are_left(image):
    container = buildah("from", IMAGE).strip()
    try:
        script = "for p in gcc cc make g++; do command -v $p && exit 1; done; test ! -e /root/.cache/pip && test ! -e /app/src"
        buildah("run", "--isolation", "chroot", container, "--", "sh", "-c", script)
    finally:
        buildah("rm", container)


def test_the_image_serves_a_tiny_model(image, llama_dir, tmp_path):
    model = Path(shutil.copytree(llama_dir, tmp_path / "model"))
    for path in [model, *model.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)  # the image runs as uid 1000; pytest's folders are root's alone
    container = buildah("from", IMAGE).strip()
    port = free_port()
    mount = ["--volume", f"{model}:/model:ro"]
    serve = [*image["config"]["Entrypoint"], "--model", "/model", "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port)]
    command = [*BUILDAH, "run", "--isolation", "chroot", "--network", "host", *mount, container, "--", *serve]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        try:
            wait_healthy(f"http://127.0.0.1:{port}", 300, server)
        except AssertionError:
            server.kill()
            raise AssertionError(f"the server in the image did not start:\n{server.communicate()[0][-3000:]}") from None
        out = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": "tiny", "prompt": "import", "max_tokens": 4}, timeout=60).json()
        assert out["object"] == "text_completion" and out["usage"]["completion_tokens"] <= 4
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        buildah("rm", container)
