"""Destinations are checked before any long work, and their errors are classified (issue 14).

Real parts: the moto S3 server on loopback that test_upload.py starts (through s3fs, as in production),
a second moto server that checks credentials (INITIAL_NO_AUTH_ACTION_COUNT=0), real files and folders,
real `kit` processes. Permanent failures must fail at once: the commands run with 5 retries and a
30 s first backoff, so a retried permanent error would outlive the subprocess bound (120 s) by far,
and its message would say "after N attempts". Nothing here needs DeepSpeed: the run directories hold
folders written by kit.checkpoint.write_manifest, which convert and stream treat as checkpoints until
they read the ZeRO files.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kit import checkpoint as ck
from kit.ledger import read_all
from kit.tools.remote import UploadError, classify, probe
from tests.test_upload import BUCKET, _free_port, make_folder, s3, wait_for_port  # noqa: F401 (s3: a fixture)

SLOW_RETRIES = ("--retries", "5", "--backoff", "30")


def kit(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kit.tools.cli", *args], capture_output=True, text=True,
                          env=dict(os.environ, KIT_FAULTS="", **(env or {})), timeout=120)


def one_error_line(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("kit: error:")]
    assert len(errors) == 1, res.stderr
    assert "attempts" not in errors[0] and "run the same command again" not in errors[0], "retried as transient"
    return errors[0]


def fake_run(tmp_path: Path, steps: tuple[int, ...] = (2, 4, 6)) -> Path:
    """A run directory holding complete kit checkpoints (kit manifests over opaque bytes)."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "run.toml").write_text("")
    for step in steps:
        make_folder(run / "checkpoints" / ck.tag_for(step), files=2, size=1000)
        ck.write_manifest(run / "checkpoints" / ck.tag_for(step), step, {"consumed": step * 8})
    return run


@pytest.fixture(scope="module")
def s3_auth() -> Iterator[str]:
    """A moto server that checks credentials: unknown keys are refused (HTTP 403), as by AWS."""
    port = _free_port()
    proc = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0"))
    try:
        wait_for_port(proc, port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ------------------------------------------------------------------------------ permanent: at once


@pytest.mark.usefixtures("s3")
def test_missing_credentials_fail_at_once_with_advice(tmp_path: Path) -> None:
    src = make_folder(tmp_path / "src")
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true", KIT_FAULTS="")
    res = subprocess.run([sys.executable, "-m", "kit.tools.cli", "upload", str(src), f"s3://{BUCKET}/x",
                          *SLOW_RETRIES], capture_output=True, text=True, env=env, timeout=120)
    line = one_error_line(res)
    assert "no usable credentials" in line and "AWS_ACCESS_KEY_ID" in line


def test_auth_refused_fails_at_once(s3_auth: str, tmp_path: Path) -> None:
    src = make_folder(tmp_path / "src")
    res = kit("upload", str(src), f"s3://{BUCKET}/x", *SLOW_RETRIES,
              env={"AWS_ENDPOINT_URL": s3_auth, "AWS_ACCESS_KEY_ID": "AKIAUNKNOWN000000000",
                   "AWS_SECRET_ACCESS_KEY": "not-a-secret", "AWS_DEFAULT_REGION": "us-east-1"})
    assert "permission denied" in one_error_line(res)


@pytest.mark.parametrize(("url", "message"), [
    ("s3://Bad_Bucket!/x", "is not a valid S3 bucket name"),
    ("s3://ab/x", "is not a valid S3 bucket name"),
    ("s3://kit-no-such-bucket/x", "the bucket does not exist"),
])
@pytest.mark.usefixtures("s3")
def test_invalid_or_missing_bucket_fails_at_once(tmp_path: Path, url: str, message: str) -> None:
    src = make_folder(tmp_path / "src")
    assert message in one_error_line(kit("upload", str(src), url, *SLOW_RETRIES))


def test_a_file_in_the_way_fails_at_once(tmp_path: Path) -> None:
    src = make_folder(tmp_path / "src")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert "is an existing file, not a folder" in one_error_line(kit("upload", str(src), str(blocker),
                                                                     *SLOW_RETRIES))
    assert "is a file, so" in one_error_line(kit("upload", str(src), f"{blocker}/sub/dest", *SLOW_RETRIES))
    assert blocker.read_text() == "not a folder"


def test_classification_of_real_client_errors() -> None:
    """The exception types s3fs/botocore raise, as they raise them (no server needed)."""
    import errno

    from botocore.exceptions import EndpointConnectionError, NoCredentialsError, ParamValidationError

    assert "credentials" in (classify(NoCredentialsError()) or "")
    assert "bucket name is invalid" in (classify(ParamValidationError(report='Invalid bucket name "A_B"')) or "")
    assert "full" in (classify(OSError(errno.ENOSPC, "No space left on device")) or "")
    assert "a file is in the way" in (classify(FileExistsError(errno.EEXIST, "File exists")) or "")
    for transient in (EndpointConnectionError(endpoint_url="http://x"), ConnectionResetError(), TimeoutError(),
                      OSError(errno.EIO, "I/O error")):
        assert classify(transient) is None, transient


# ---------------------------------------------------------------------------- before any long work


@pytest.mark.usefixtures("s3")
def test_convert_checks_its_destination_before_converting(tmp_path: Path) -> None:
    """Each destination fails on its own problem, not on the (fake) checkpoint that a conversion would
    read first: the check comes before any work, and no export or ledger event appears."""
    run = fake_run(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for out, message in [(f"s3://kit-no-such-bucket-{os.getpid()}/x", "the bucket does not exist"),
                         ("s3://Not_A_Bucket/x", "is not a valid S3 bucket name"),
                         (f"{blocker}/export", "is a file, so"),
                         (str(run / "checkpoints" / "step_0000006"), "already exists")]:
        line = one_error_line(kit("convert", str(run), "--out", out))
        assert message in line, (out, line)
    assert not (run / "exports").exists() and not (run / "ledger").exists()


@pytest.mark.parametrize("target", ["checkpoint", "run", "other"])
def test_convert_force_never_replaces_a_checkpoint_or_a_run(tmp_path: Path, target: str) -> None:
    run = fake_run(tmp_path)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    out = {"checkpoint": run / "checkpoints" / "step_0000006", "run": run, "other": other}[target]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    line = one_error_line(kit("convert", str(run), "--out", str(out), "--force"))
    assert "--force replaces only an earlier export" in line
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.slow
@pytest.mark.usefixtures("s3")
def test_stream_checks_its_destination_before_shipping(tmp_path: Path) -> None:
    run = fake_run(tmp_path)
    line = one_error_line(kit("stream", str(run), "--to", f"s3://kit-no-such-bucket-{os.getpid()}", "--once"))
    assert "the bucket does not exist" in line
    assert not [e for e in read_all(run) if e["kind"] in ("ckpt_verified", "ckpt_uploaded")]
    ok = kit("stream", str(run), "--to", f"s3://{BUCKET}/streamed-{os.getpid()}", "--once")
    assert ok.returncode == 0 and "shipped 3 checkpoint(s)" in ok.stdout, ok.stderr


def test_stream_keep_last_negative_is_refused_and_deletes_nothing(tmp_path: Path) -> None:
    """`--keep-last -2` used to exit 0 after deleting local checkpoints."""
    run = fake_run(tmp_path)
    res = kit("stream", str(run), "--to", str(tmp_path / "remote"), "--once", "--keep-last", "-2")
    assert res.returncode == 2 and "kit: error: kit stream: argument --keep-last: must be at least 0" in res.stderr
    assert [c.step for c in ck.scan(run / "checkpoints")[0]] == [2, 4, 6]
    shipped = kit("stream", str(run), "--to", str(tmp_path / "remote"), "--once", "--keep-last", "1")
    assert shipped.returncode == 0, shipped.stderr
    assert [c.step for c in ck.scan(run / "checkpoints")[0]] == [6]  # shipped and verified: the older ones go


@pytest.mark.slow
@pytest.mark.usefixtures("s3")
def test_verify_of_a_path_that_does_not_exist_says_so(tmp_path: Path) -> None:
    for target in (str(tmp_path / "nothing"), f"file://{tmp_path}/nothing", f"s3://{BUCKET}/nothing-{os.getpid()}"):
        line = one_error_line(kit("verify", target))
        assert "does not exist: nothing to verify" in line and "incomplete" not in line, line
    (tmp_path / "empty").mkdir()
    res = kit("verify", str(tmp_path / "empty"))
    assert res.returncode == 1 and "incomplete" in res.stdout + res.stderr


@pytest.mark.usefixtures("s3")
def test_probe_leaves_nothing_behind(tmp_path: Path) -> None:
    import fsspec

    probe(f"s3://{BUCKET}/probed")
    probe(str(tmp_path / "not" / "yet"))
    assert not (tmp_path / "not").exists(), "a local destination is not created by its probe"
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    assert not fs.exists(f"{BUCKET}/probed")
    with pytest.raises(UploadError, match="is an existing file") as e:
        probe(str(make_folder(tmp_path / "src") / ck.MANIFEST))
    assert e.value.permanent
