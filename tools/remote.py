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
    """A destination cannot be written, is full, or keeps failing after retries."""


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

    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise UploadError(f"cannot open {redact(url)}: {scrub(str(e))}") from None
    return fs, str(root).rstrip("/")


def retrying(fn: Callable[[], T], what: str, retries: int = 5, backoff_s: float = 1.0) -> T:
    """Run ``fn``; on transient errors wait backoff_s * 2^attempt (jittered, capped at 60 s) and retry.

    A permission error or a full disk is not transient: it fails at once with what to do.
    """
    import errno

    for attempt in range(retries + 1):
        try:
            return fn()
        except (FileNotFoundError, NotADirectoryError) as e:  # a path problem: retrying will not help
            raise UploadError(f"{what}: {scrub(str(e))}; check the destination path") from None
        except PermissionError as e:
            raise UploadError(f"{what}: permission denied ({scrub(str(e))}); check the destination's "
                              "credentials and write access") from None
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise UploadError(f"{what}: the destination is full ({scrub(str(e))}); free space or "
                                  "choose another destination") from None
            if e.errno in (errno.EROFS, errno.EACCES):
                raise UploadError(f"{what}: the destination is not writable ({scrub(str(e))})") from None
            err: BaseException = e
        except (ValueError, TypeError) as e:  # a malformed request (bucket name, URL): retrying will not help
            raise UploadError(f"{what}: {type(e).__name__}: {scrub(str(e))}; check the URL") from None
        except Exception as e:
            err = e
        if attempt == retries:
            raise UploadError(f"{what} failed after {retries + 1} attempts: {type(err).__name__}: "
                              f"{scrub(str(err))}; run the same command again to resume") from None
        time.sleep(min(60.0, backoff_s * 2**attempt) * (0.5 + random.random() / 2))
    raise AssertionError("unreachable")


def sha256_remote(fs: Any, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb", block_size=CHUNK) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_json(fs: Any, path: str) -> dict[str, Any] | None:
    try:
        data = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except ValueError:
        return None  # a torn or foreign file is not a manifest
    return data if isinstance(data, dict) else None


def check_files(files: dict[str, dict[str, Any]], size_of: Callable[[str], int | None],
                hash_of: Callable[[str], str] | None, jobs: int = 4) -> list[str]:
    """Problems of a folder against a manifest's ``files`` (sizes always, hashes when asked)."""
    def one(item: tuple[str, dict[str, Any]]) -> str:
        rel, info = item
        size = size_of(rel)
        if size is None:
            return f"{rel}: missing"
        if size != info["size"]:
            return f"{rel}: size {size} != {info['size']}"
        if hash_of is not None and hash_of(rel) != info["sha256"]:
            return f"{rel}: sha256 mismatch"
        return ""

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return [p for p in pool.map(one, sorted(files.items())) if p]


def verify_url(url: str, hashes: bool = True, jobs: int = 4) -> tuple[dict[str, Any] | None, list[str]]:
    """Check an uploaded folder against its KIT_UPLOAD.json; (manifest, problems)."""
    fs, root = open_fs(url)
    fs.invalidate_cache()
    manifest = retrying(lambda: read_json(fs, f"{root}/{UPLOAD_MANIFEST}"), f"reading {redact(url)}", retries=2)
    if manifest is None:
        return None, [f"no {UPLOAD_MANIFEST}: the upload is incomplete (or this is not an upload); "
                      "run `kit upload` again"]

    def size_of(rel: str) -> int | None:
        try:
            return int(fs.info(f"{root}/{rel}")["size"])
        except FileNotFoundError:
            return None

    def hash_of(rel: str) -> str:
        return retrying(lambda: sha256_remote(fs, f"{root}/{rel}"), f"reading {rel}", retries=2)

    return manifest, check_files(manifest.get("files", {}), lambda rel: retrying(
        lambda: size_of(rel), f"reading {rel}", retries=2), hash_of if hashes else None, jobs)


def verify_local(path: Path, hashes: bool = True, jobs: int = 4) -> tuple[dict[str, Any] | None, list[str]]:
    """Check a local folder (a checkpoint, an export) against its MANIFEST.json."""
    from kit.checkpoint import MANIFEST, read_manifest, sha256

    manifest = read_manifest(path)
    if manifest is None:
        return None, [f"no {MANIFEST}: {path} is incomplete (or not a checkpoint or export)"]

    def size_of(rel: str) -> int | None:
        p = path / rel
        return p.stat().st_size if p.is_file() else None

    return manifest, check_files(manifest.get("files", {}), size_of,
                                 (lambda rel: sha256(path / rel)) if hashes else None, jobs)
