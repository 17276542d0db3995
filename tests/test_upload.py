"""`kit upload` / `kit verify` against a real S3-protocol server (moto_server on loopback, through
s3fs) and the local filesystem.

The cut is real: the uploading process is SIGKILLed by a kit fault point after some files landed
(KIT_FAULTS=upload.file_done@N), then the same command resumes. Nothing is mocked; the folder is a
real kit manifest folder (kit.checkpoint.write_manifest) of random bytes, so no DeepSpeed is needed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kit import checkpoint as ck
from kit.errors import CheckpointError
from kit.tools.remote import UPLOAD_MANIFEST, UploadError, redact, retrying, scrub, verify_url
from kit.tools.upload import upload_folder

BUCKET = "kit-test"
SECRET = "S3cr3tValue-do-not-print"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(proc: subprocess.Popen[bytes], port: int, timeout: float = 30.0) -> None:
    """Until ``proc`` (a moto server) accepts connections on ``port``; raises if it exits or never does."""
    deadline = time.time() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.2)


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    """A moto S3 server on a loopback port, credentials and endpoint in the environment (as in production)."""
    port = _free_port()
    proc = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # fsspec reuses a filesystem (and its endpoint) per process
    try:
        wait_for_port(proc, port)
        import boto3

        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket=BUCKET)
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_folder(path: Path, files: int = 6, size: int = 300_000) -> Path:
    """A folder like a checkpoint: random files, one in a subfolder, and a kit MANIFEST.json last."""
    (path / "sub").mkdir(parents=True)
    for i in range(files):
        (path / (f"sub/part_{i}.bin" if i == 0 else f"part_{i}.bin")).write_bytes(os.urandom(size + i))
    ck.write_manifest(path, 1, {"step": 1})
    return path


def kit(*args: str, faults: str = "") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, KIT_FAULTS=faults)
    return subprocess.run([sys.executable, "-m", "kit.tools.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_s3_roundtrip_resend_only_changes_and_detect_tampering(s3: dict[str, str], tmp_path: Path) -> None:
    src = make_folder(tmp_path / "src")
    url = f"s3://{BUCKET}/roundtrip/step_0000001"
    first = upload_folder(src, url, jobs=3)
    assert (first.sent, first.skipped, first.files) == (7, 0, 7)  # 6 parts, MANIFEST.json, nothing else
    manifest, problems = verify_url(url)
    assert manifest is not None and problems == []
    assert set(manifest["files"]) == {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}

    again = upload_folder(src, url)
    assert (again.sent, again.skipped) == (0, 7)
    (src / "part_3.bin").write_bytes(os.urandom(1000))
    ck.write_manifest(src, 1, {"step": 1})
    changed = upload_folder(src, url)
    assert (changed.sent, changed.skipped) == (2, 5)  # the changed file and the manifest

    import boto3

    client = boto3.client("s3", region_name="us-east-1")
    key = "roundtrip/step_0000001/part_2.bin"
    body = bytearray(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    body[0] ^= 1
    client.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))
    _, problems = verify_url(url)
    assert problems == ["part_2.bin: sha256 mismatch"]
    _, quick = verify_url(url, hashes=False)
    assert quick == []  # sizes alone cannot see it: that is what the hashes are for
    res = kit("verify", url, "--json")
    assert res.returncode == 1 and json.loads(res.stdout)["problems"] == ["part_2.bin: sha256 mismatch"]


@pytest.mark.parametrize("dest", ["s3", "file"])
def test_cut_mid_upload_then_resume(s3: dict[str, str], tmp_path: Path, dest: str) -> None:
    src = make_folder(tmp_path / "src", files=6, size=2_000_000)
    url = f"s3://{BUCKET}/cut/step_0000001" if dest == "s3" else f"file://{tmp_path}/remote/step_0000001"
    cut = kit("upload", str(src), url, "--json", "--jobs", "1", faults="upload.file_done@3")
    assert cut.returncode == -9, cut.stderr  # SIGKILLed after the 3rd file landed
    manifest, problems = verify_url(url)
    assert manifest is None and "incomplete" in problems[0]  # never looks complete before it is

    resumed = kit("upload", str(src), url, "--json", "--jobs", "2")
    assert resumed.returncode == 0, resumed.stderr
    out = json.loads(resumed.stdout)
    assert out["skipped"] == 3 and out["sent"] == 4 and out["files"] == 7
    ok = kit("verify", url)
    assert ok.returncode == 0 and "OK, 7 file(s)" in ok.stdout


def test_corrupt_source_and_bad_destinations(s3: dict[str, str], tmp_path: Path) -> None:
    src = make_folder(tmp_path / "src")
    (src / "part_1.bin").write_bytes(b"x" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        upload_folder(src, f"{tmp_path}/never")
    assert not (tmp_path / "never").exists()

    good = make_folder(tmp_path / "good")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(UploadError, match=r"a-file is a file, so .* cannot be a folder under it") as e:
        upload_folder(good, f"file://{blocker}/dest", retries=1, backoff_s=0.01)
    assert e.value.permanent and e.value.attempts == 1

    with pytest.raises(UploadError, match=r"bucket does not exist.*create it or fix the URL") as e:
        upload_folder(good, f"s3://no-such-bucket-{os.getpid()}/x", retries=3, backoff_s=30)
    assert e.value.permanent and e.value.attempts == 1
    with pytest.raises(UploadError, match=r"does not exist: nothing to verify"):
        verify_url(f"s3://{BUCKET}/nothing-here")


def test_a_full_destination_fails_at_once_and_never_looks_complete(tmp_path: Path, full_fs: Path) -> None:
    """A real 64 KiB filesystem: ENOSPC is not retried, says what to do, and no manifest appears."""
    src = make_folder(tmp_path / "src", files=2, size=100_000)  # 200 KB
    t0 = time.monotonic()
    with pytest.raises(UploadError, match=r"the destination is full.*free space or choose another destination"):
        upload_folder(src, f"file://{full_fs}/dest", retries=5, backoff_s=1.0)
    assert time.monotonic() - t0 < 5, "not retried with backoff"
    _, problems = verify_url(f"file://{full_fs}/dest")
    assert "incomplete" in problems[0]


def test_credentials_never_printed(s3: dict[str, str], tmp_path: Path) -> None:
    src = make_folder(tmp_path / "src")
    res = kit("upload", str(src), f"s3://testing:{SECRET}@{BUCKET}/x?token={SECRET}", "--retries", "0")
    assert res.returncode == 1
    assert SECRET not in res.stdout + res.stderr and "Traceback" not in res.stderr
    assert redact(f"s3://user:{SECRET}@b/p?sig={SECRET}") == "s3://b/p"
    assert SECRET not in scrub(f"boom at https://u:{SECRET}@h/p?X-Amz-Signature=abc and {SECRET}")


def test_retries_with_backoff_then_give_up() -> None:
    calls: list[float] = []

    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "ok"

    assert retrying(flaky, "sending", retries=3, backoff_s=0.05) == "ok"
    assert len(calls) == 3
    assert calls[1] - calls[0] >= 0.025 and calls[2] - calls[1] >= 0.05  # 0.05 s, then 0.1 s, each jittered -50%

    def dead() -> None:
        raise TimeoutError("timed out")

    with pytest.raises(UploadError, match=r"after 3 attempts.*run the same command again"):
        retrying(dead, "sending", retries=2, backoff_s=0.01)
    assert UPLOAD_MANIFEST == "KIT_UPLOAD.json"
