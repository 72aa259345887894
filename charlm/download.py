"""Fetch the raw corpus: http(s), file:// or a plain path, verified by sha256, written atomically.

Torch-free so that the `download` stage starts in milliseconds. Transient failures (connection
errors, timeouts, HTTP 5xx/429, a body cut short) are retried with exponential backoff; everything
else fails at once. The environment variable CHARLM_DATA_FILE names a local copy of the *pinned*
corpus to read instead of the network. DVC tracks params, not environment variables, so the copy is
used only when `data.sha256` is set and it matches: the output is then byte-identical to a download.
With `data.sha256: ""` it is refused (point `data.url` at the file instead, which DVC does track).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from charlm import io
from charlm.errors import CharlmError

DATA_FILE_ENV = "CHARLM_DATA_FILE"
OFFLINE_HINT = f"offline? set {DATA_FILE_ENV}=/path/to/input.txt to use a local copy (it must match data.sha256)"
_CHUNK = 1 << 16


class DownloadError(CharlmError):
    """One line: what was fetched, why it failed, how to fix it."""


class _Transient(Exception):
    """A failure worth another try."""


@dataclass(frozen=True)
class DownloadConfig:
    timeout: float = 30.0  # seconds for the connection and for each read from it
    retries: int = 3  # tries in all
    backoff: float = 1.0  # seconds before the 2nd try, doubled each time
    max_bytes: int = 1 << 31  # refuse bodies larger than this (2 GiB)
    max_redirects: int = 5


def resolve_source(url: str, sha256: str, env: dict[str, str] | None = None) -> str:
    """The source actually read: CHARLM_DATA_FILE when set (only for a pinned corpus), else `url`."""
    env = os.environ if env is None else env
    local = env.get(DATA_FILE_ENV)
    if not local:
        return url
    if not sha256:
        raise DownloadError(
            f"{DATA_FILE_ENV} is set but data.sha256 is empty, so DVC could not know which corpus was used; "
            f"pin data.sha256, or set data.url to {local} (DVC tracks params) and unset {DATA_FILE_ENV}"
        )
    return local


def _local_path(source: str) -> Path | None:
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme in ("http", "https"):
        return None
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter is a Windows drive, i.e. a path
        raise DownloadError(f"{source}: unsupported URL scheme {parsed.scheme!r}; use http, https, file:// or a path")
    return Path(source)


def _copy_capped(src: BinaryIO, dst: BinaryIO, max_bytes: int, digest: hashlib._Hash) -> int:
    total = 0
    while chunk := src.read(_CHUNK):
        total += len(chunk)
        if total > max_bytes:
            raise DownloadError(f"body is larger than the {max_bytes:,}-byte cap; is data.url the right file?")
        digest.update(chunk)
        dst.write(chunk)
    return total


class _LimitedRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, limit: int) -> None:
        self.max_redirections = limit
        self.max_repeats = limit


def _fetch_http(url: str, dst: BinaryIO, cfg: DownloadConfig, digest: hashlib._Hash) -> int:
    opener = urllib.request.build_opener(_LimitedRedirects(cfg.max_redirects))
    request = urllib.request.Request(url, headers={"User-Agent": "charlm"})
    try:
        with opener.open(request, timeout=cfg.timeout) as response:
            expected = response.headers.get("Content-Length")
            if expected is not None and int(expected) > cfg.max_bytes:
                raise DownloadError(f"body of {int(expected):,} bytes is over the {cfg.max_bytes:,}-byte cap")
            total = _copy_capped(response, dst, cfg.max_bytes, digest)
            if expected is not None and total != int(expected):
                raise _Transient(f"body cut short: got {total:,} of {int(expected):,} bytes")
            return total
    except urllib.error.HTTPError as e:
        if e.code in (301, 302, 303, 307, 308):
            raise DownloadError(f"too many redirects (more than {cfg.max_redirects})") from None
        if e.code >= 500 or e.code == 429:
            raise _Transient(f"HTTP {e.code} {e.reason}") from None
        raise DownloadError(f"HTTP {e.code} {e.reason}") from None
    except http.client.IncompleteRead as e:
        raise _Transient(f"body cut short after {len(e.partial):,} bytes") from None
    except TimeoutError as e:
        raise _Transient(f"timed out after {cfg.timeout:g} s ({e})") from None
    except urllib.error.URLError as e:
        raise _Transient(f"cannot connect ({e.reason})") from None
    except (ConnectionError, http.client.HTTPException, OSError) as e:
        raise _Transient(f"connection failed ({e})") from None


def download(
    url: str,
    out: str | Path,
    sha256: str,
    cfg: DownloadConfig = DownloadConfig(),
    env: dict[str, str] | None = None,
    log: Callable[[str], None] = print,
) -> str:
    """Fetch `url` (or CHARLM_DATA_FILE) into `out`, verify it, and return its sha256.

    `sha256=""` accepts any content and warns that the data is not pinned.
    Raises `DownloadError`; on any failure nothing is left at `out`.
    """
    source = resolve_source(url, sha256, env)
    via_env = source != url
    local = _local_path(source)
    offline_hint = "" if local is not None else f"; {OFFLINE_HINT}"
    last_error = ""
    for attempt in range(1, cfg.retries + 1):
        digest = hashlib.sha256()
        try:
            with io.atomic_open(out, "wb") as dst:
                if local is not None:
                    try:
                        with open(local, "rb") as src:
                            size = _copy_capped(src, dst, cfg.max_bytes, digest)
                    except OSError as e:
                        raise DownloadError(f"cannot read {local} ({e.strerror})") from None
                else:
                    size = _fetch_http(source, dst, cfg, digest)
                actual = digest.hexdigest()
                if sha256 and actual != sha256:
                    raise DownloadError(
                        f"the local copy {DATA_FILE_ENV}={source} is not the pinned corpus: sha256 {actual}, "
                        f"data.sha256 {sha256}; point {DATA_FILE_ENV} at the right file or unset it"
                        if via_env
                        else f"sha256 mismatch: expected {sha256}, got {actual} ({size:,} bytes); "
                        "wrong file, or set data.sha256 to pin the new content"
                    )
            if not sha256:
                log(f"warning: data.sha256 is empty, so {source} is not pinned; its sha256 is {actual}")
            if via_env:
                log(f"used the local copy {DATA_FILE_ENV}={source} instead of {url} (sha256 matches data.sha256)")
            log(f"fetched {source} ({size:,} bytes, sha256 {actual[:12]}...)")
            return actual
        except _Transient as e:
            last_error = str(e)
            if attempt < cfg.retries:
                delay = cfg.backoff * 2 ** (attempt - 1)
                log(f"try {attempt}/{cfg.retries} of {source} failed ({e}); retrying in {delay:g} s")
                time.sleep(delay)
        except DownloadError as e:
            raise DownloadError(f"download of {source} failed: {e}{'' if via_env else offline_hint}") from None
    raise DownloadError(f"download of {source} failed after {cfg.retries} tries: {last_error}{offline_hint}")
