"""Destinations: fsspec URLs, credential redaction, retries, and checking a folder against its manifest.

Credentials come from the environment or fsspec's own configuration (``~/.config/fsspec``, AWS
profiles, ``HF_TOKEN``). A URL may still carry some (``s3://KEY:SECRET@bucket``, ``?token=``):
every URL and every error text that leaves this package goes through :func:`redact` or
:func:`scrub` first, so nothing secret reaches a terminal, a log or the ledger.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from kit.errors import KitError

UPLOAD_MANIFEST = "KIT_UPLOAD.json"  # written last at a destination: complete iff present
JOURNAL = ".kit-upload"  # per-file "sha256 size" notes written after each file landed (resume)
CHUNK = 8 << 20
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "HF_TOKEN",
              "HUGGING_FACE_HUB_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_KEY",
              "AZURE_STORAGE_CONNECTION_STRING", "FSSPEC_S3_SECRET")
T = TypeVar("T")


class UploadError(KitError):
    """A destination cannot be written, is full, or keeps failing after retries.

    ``permanent``: retrying cannot help (credentials, a missing bucket, an invalid name, a path that is
    a file...): the message says what to fix. ``attempts``: how many times it was tried."""

    def __init__(self, message: str, permanent: bool = False, attempts: int = 1) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.attempts = attempts


def is_url(text: str) -> bool:
    return "://" in text


def redact(url: str) -> str:
    """A URL without user info, query or fragment: ``s3://K:S@b/p?x=1`` -> ``s3://b/p``."""
    url = re.sub(r"^([a-zA-Z][\w+.-]*://)[^/@]*@", r"\1", url)
    return re.split(r"[?#]", url, maxsplit=1)[0]


def scrub(text: str) -> str:
    """Error text safe to print: URLs redacted, secret values from the environment masked."""
    text = re.sub(r"([a-zA-Z][\w+.-]*://)[^/@\s]*@", r"\1", text)
    text = re.sub(r"[^\s/\"':@]+:[^\s/\"'@]+@", "***@", text)  # user:secret@ without its scheme
    text = re.sub(r"([?&](?:token|sig|signature|key|secret|X-Amz-[\w-]+)=)[^&\s'\"]+", r"\1***", text, flags=re.I)
    for name in SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= 4:
            text = text.replace(value, "***")
    return text


def open_fs(url: str) -> tuple[Any, str]:
    """The filesystem and root path of a URL (or a local path)."""
    import fsspec

    check_name(url)
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise UploadError(f"cannot open {redact(url)}: {scrub(str(e))}", permanent=True) from None
    return fs, str(root).rstrip("/")


# --------------------------------------------------------------------------------- classification

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_S3_SCHEMES = ("s3", "s3a", "s3n")
# S3 error codes that no retry can fix (botocore ClientError codes, when s3fs passes them through)
_PERMANENT_CODES = {
    "InvalidAccessKeyId": "the access key is not known: check the credentials",
    "SignatureDoesNotMatch": "the secret key does not match: check the credentials",
    "ExpiredToken": "the session token has expired: refresh the credentials",
    "InvalidToken": "the session token is invalid: refresh the credentials",
    "AccessDenied": "access denied: check the credentials and the destination's write permission",
    "AllAccessDisabled": "access to the bucket is disabled: ask its owner",
    "AccountProblem": "the account has a problem: ask its owner",
    "NoSuchBucket": "the bucket does not exist: create it or fix the URL",
    "InvalidBucketName": "the bucket name is invalid: fix the URL",
}


def check_name(url: str) -> None:
    """Refuse, before any request, an S3 URL whose bucket name can never exist (S3's naming rules:
    3-63 lowercase letters, digits, dots and hyphens; a service answers "does not exist" to those)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _S3_SCHEMES:
        return
    bucket = rest.rsplit("@", 1)[-1].split("/", 1)[0]
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise UploadError(f"{redact(url)}: {bucket!r} is not a valid S3 bucket name (3-63 lowercase letters, "
                          "digits, dots and hyphens, starting and ending with a letter or digit); fix the URL",
                          permanent=True)


def classify(e: BaseException) -> str | None:
    """Advice for an error that retrying cannot fix (auth refused, no credentials, not found, an
    invalid name, a path that is not a folder, a full or read-only destination); None: transient
    (a timeout, a reset connection, a 5xx, throttling), worth retrying with backoff."""
    import errno

    name = type(e).__name__
    text = scrub(str(e))
    if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                "NoAuthTokenError", "ProfileNotFound"):
        return (f"no usable credentials ({text}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                "AWS_PROFILE), HF_TOKEN for hf://, or the back end's fsspec configuration")
    if name == "ParamValidationError":
        hint = "the bucket name is invalid" if "bucket" in text.lower() else "the request is malformed"
        return f"{hint} ({text.splitlines()[-1] if text else name}); fix the URL"
    code = str(getattr(e, "response", {}).get("Error", {}).get("Code", "")) if hasattr(e, "response") else ""
    if code in _PERMANENT_CODES:
        return f"{_PERMANENT_CODES[code]} ({text})"
    if isinstance(e, PermissionError):
        return (f"permission denied ({text}); check the destination's credentials and write access")
    if isinstance(e, FileNotFoundError):
        if "bucket" in text.lower():
            return f"the bucket does not exist ({text}); create it or fix the URL"
        return f"not found ({text}); check the destination path"
    if isinstance(e, (NotADirectoryError, FileExistsError)) or getattr(e, "errno", None) == errno.ENOTDIR:
        return f"a file is in the way ({text}): the destination must be a folder; choose another path"
    if isinstance(e, IsADirectoryError):
        return f"a folder is in the way ({text}); choose another path"
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the destination is full ({text}); free space or choose another destination"
    if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"the destination is not writable ({text})"
    if isinstance(e, (ValueError, TypeError)):  # a malformed request (bucket name, URL)
        return f"{type(e).__name__}: {text}; check the URL"
    return None


def retrying(fn: Callable[[], T], what: str, retries: int = 5, backoff_s: float = 1.0) -> T:
    """Run ``fn``; on transient errors wait backoff_s * 2^attempt (jittered, capped at 60 s) and retry.

    An error that cannot heal (:func:`classify`) fails at once, saying what to fix."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except UploadError:
            raise
        except Exception as e:
            advice = classify(e)
            if advice is not None:
                raise UploadError(f"{what}: {advice}", permanent=True, attempts=attempt + 1) from None
            err: BaseException = e
        if attempt == retries:
            raise UploadError(f"{what} failed after {retries + 1} attempts: {type(err).__name__}: "
                              f"{scrub(str(err))}; run the same command again to resume",
                              attempts=retries + 1) from None
        time.sleep(min(60.0, backoff_s * 2**attempt) * (0.5 + random.random() / 2))
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------- probe


def local_folder(path: Path, what: str) -> Path:
    """A local destination folder's nearest existing folder (itself, or the ancestor it would be
    created in); fails at once if it is an existing file or a file is on its way."""
    p = path.expanduser().absolute()
    if p.exists() and not p.is_dir():
        raise UploadError(f"{what}: {path} is an existing file, not a folder; choose another destination",
                          permanent=True)
    for candidate in (p, *p.parents):
        if candidate.exists():
            if not candidate.is_dir():
                raise UploadError(f"{what}: {candidate} is a file, so {path} cannot be a folder under it; choose "
                                  "another destination", permanent=True)
            return candidate
    return Path("/")


def probe(url: str, retries: int = 5, backoff_s: float = 1.0) -> None:
    """Check a destination before any long work (hashing, converting, uploading): a small file is
    written there and removed (for a local folder that does not exist yet, in the folder it would be
    created in: nothing is created). Credentials, bucket, name, permissions, a file in the way: what
    cannot work fails here at once with what to fix; a transient failure is retried like an upload."""
    safe = redact(url)
    name = f".kit-probe-{socket.gethostname().split('.')[0]}-{os.getpid()}"
    if not is_url(url) or url.startswith("file://"):
        where = local_folder(Path(url.removeprefix("file://")), f"cannot write to {safe}")
        target = where / name
        try:
            target.write_bytes(b"kit write probe")
            target.unlink()
        except OSError as e:
            raise UploadError(f"cannot write to {safe}: {classify(e) or scrub(str(e))}",
                              permanent=classify(e) is not None) from None
        return
    fs, root = open_fs(url)
    remote = f"{root}/{name}"
    retrying(lambda: fs.pipe_file(remote, b"kit write probe"), f"cannot write to {safe}", retries, backoff_s)
    try:
        fs.rm_file(remote)
    except FileNotFoundError:
        pass
    except Exception as e:  # written but not removable: a write-only bucket policy; harmless litter
        print(f"kit: note: could not remove the write probe {redact(remote)} ({scrub(str(e))})")


def exists(url: str) -> bool:
    """Whether anything is at ``url`` (a folder, a prefix with objects, a file)."""
    fs, root = open_fs(url)
    fs.invalidate_cache()
    return bool(retrying(lambda: fs.exists(root), f"reading {redact(url)}", retries=2))


def digest_remote(fs: Any, path: str, kind: str = "sha256") -> str:
    """A remote file's sha256 (hex) or CRC-32 (8 hex digits, as manifests write it), read once."""
    from kit.crc import crc32

    h, crc = hashlib.sha256(), 0
    with fs.open(path, "rb", block_size=CHUNK) as f:
        while chunk := f.read(CHUNK):
            if kind == "sha256":
                h.update(chunk)
            else:
                crc = crc32(chunk, crc)
    return h.hexdigest() if kind == "sha256" else f"{crc:08x}"


def read_json(fs: Any, path: str) -> dict[str, Any] | None:
    try:
        data = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except ValueError:
        return None  # a torn or foreign file is not a manifest
    return data if isinstance(data, dict) else None


def check_files(files: dict[str, dict[str, Any]], size_of: Callable[[str], int | None],
                hash_of: Callable[[str, str], str] | None, jobs: int = 4) -> list[str]:
    """Problems of a folder against a manifest's ``files`` (sizes always, hashes when asked).
    ``hash_of(rel, kind)``: the file's digest of that kind, "sha256" where the entry lists one (a
    checkpoint, an upload), else "crc32" (an export: tools.convert writes CRC-32s)."""
    def one(item: tuple[str, dict[str, Any]]) -> str:
        rel, info = item
        size = size_of(rel)
        if size is None:
            return f"{rel}: missing"
        if size != info["size"]:
            return f"{rel}: size {size} != {info['size']}"
        if hash_of is not None:
            kind = next((k for k in ("sha256", "crc32") if info.get(k)), "")
            if not kind:
                return f"{rel}: the manifest lists no sha256 or crc32 for it (damaged manifest)"
            if hash_of(rel, kind) != info[kind]:
                return f"{rel}: {kind} mismatch"
        return ""

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return [p for p in pool.map(one, sorted(files.items())) if p]


def verify_url(url: str, hashes: bool = True, jobs: int = 4) -> tuple[dict[str, Any] | None, list[str]]:
    """Check an uploaded folder against its KIT_UPLOAD.json; (manifest, problems)."""
    fs, root = open_fs(url)
    fs.invalidate_cache()
    manifest = retrying(lambda: read_json(fs, f"{root}/{UPLOAD_MANIFEST}"), f"reading {redact(url)}", retries=2)
    if manifest is None:
        if not retrying(lambda: fs.exists(root), f"reading {redact(url)}", retries=2):
            raise UploadError(f"{redact(url)} does not exist: nothing to verify; check the path (or upload first)",
                              permanent=True)
        return None, [f"no {UPLOAD_MANIFEST}: the upload is incomplete (or this is not an upload); "
                      "run `kit upload` again"]

    def size_of(rel: str) -> int | None:
        try:
            return int(fs.info(f"{root}/{rel}")["size"])
        except FileNotFoundError:
            return None

    def hash_of(rel: str, kind: str) -> str:
        return retrying(lambda: digest_remote(fs, f"{root}/{rel}", kind), f"reading {rel}", retries=2)

    return manifest, check_files(manifest.get("files", {}), lambda rel: retrying(
        lambda: size_of(rel), f"reading {rel}", retries=2), hash_of if hashes else None, jobs)


def verify_local(path: Path, hashes: bool = True, jobs: int = 4) -> tuple[dict[str, Any] | None, list[str]]:
    """Check a local folder (a checkpoint, an export) against its MANIFEST.json; (its files, problems)."""
    from kit.checkpoint import MANIFEST, crc32, read_file_list, sha256

    listed = read_file_list(path)
    if listed is None:
        return None, [f"no {MANIFEST}: {path} is incomplete (or not a checkpoint or export)"]
    files = {rel: f.to_dict() for rel, f in listed.items()}

    def size_of(rel: str) -> int | None:
        p = path / rel
        return p.stat().st_size if p.is_file() else None

    def hash_of(rel: str, kind: str) -> str:
        return sha256(path / rel) if kind == "sha256" else crc32(path / rel)

    return {"files": files}, check_files(files, size_of, hash_of if hashes else None, jobs)
