"""Safe HTTP downloads for the offline-data step: resumable, verified, and atomic.

A file is fetched into `<name>.part`, continued with an HTTP Range request when the server honours one
(otherwise fetched again from the start), checked against the size the server announced and against a
caller-supplied `verify` function, and only then renamed to its final name. A file that fails verification
is deleted and fetched again, a bounded number of times with exponential backoff; nothing unverified ever
carries a final name. Connect and read both time out, so a stalled server cannot hang the caller.

Only the standard library does the HTTP work (urllib.request); pyarrow is imported by `verify_parquet` when
it is called. Nothing happens at import time.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Literal

from nanochat.leftovers import temp_name

PARQUET_MAGIC = b"PAR1"
USER_AGENT = "nanochat-download/1 (python urllib)"
RETRYABLE_HTTP_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
RANGE_NOT_SATISFIABLE = 416

ProgressCallback = Callable[[int, "int | None"], None]
"""Called as progress(bytes_on_disk, total_bytes_or_None) while a file downloads; bytes may go back to 0
when a download restarts from the beginning."""


class VerificationError(ValueError):
    """The file's content is not what it should be (wrong size, bad footer, corrupt archive)."""


class DownloadError(RuntimeError):
    """A download failed for good (retries exhausted, or a permanent HTTP error such as 404)."""


class _RetryableError(Exception):
    """A network-level failure worth another attempt; the `.part` file is kept for resuming."""


@dataclass(frozen=True)
class DownloadResult:
    """A verified file under its final name; `verified-existing` means it was already there and valid."""

    path: Path
    size: int
    status: Literal["downloaded", "verified-existing"]
    attempts: int
    bytes_transferred: int
    resumed: bool


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def verify_parquet(path: Path, required_column: str = "text") -> None:
    """Cheap footer-level check: PAR1 at both ends, a readable footer, and the required column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    size = path.stat().st_size
    if size < 2 * len(PARQUET_MAGIC) + 4:
        raise VerificationError(f"{path.name}: {size} bytes is too small to be a parquet file")
    with open(path, "rb") as fh:
        head = fh.read(len(PARQUET_MAGIC))
        fh.seek(-len(PARQUET_MAGIC), os.SEEK_END)
        tail = fh.read(len(PARQUET_MAGIC))
    if head != PARQUET_MAGIC or tail != PARQUET_MAGIC:
        raise VerificationError(f"{path.name}: missing the PAR1 magic bytes (truncated or not parquet)")
    try:
        schema_names = pq.ParquetFile(path).schema_arrow.names
    except (pa.ArrowException, OSError) as exc:
        raise VerificationError(f"{path.name}: unreadable parquet footer ({exc})") from exc
    if required_column not in schema_names:
        raise VerificationError(f"{path.name}: no {required_column!r} column (columns: {schema_names})")


def verify_zip(path: Path) -> None:
    """Every member's CRC checks out and the archive is not empty."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            if not archive.infolist():
                raise VerificationError(f"{path.name}: empty zip archive")
            bad_member = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise VerificationError(f"{path.name}: not a valid zip archive ({exc})") from exc
    if bad_member is not None:
        raise VerificationError(f"{path.name}: member {bad_member!r} fails its CRC check")


def extract_zip_atomically(zip_path: Path, dest_dir: Path) -> Path:
    """Extract into a temporary sibling folder, then rename it to dest_dir (replacing an old one).

    When the archive holds exactly one top-level folder, that folder's contents become dest_dir, so
    `eval_bundle.zip` holding `eval_bundle/...` extracts to `dest_dir/...`, not `dest_dir/eval_bundle/...`.
    """
    dest_dir = Path(dest_dir)
    staging = dest_dir.with_name(temp_name(dest_dir.name, "extract"))
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with zipfile.ZipFile(zip_path) as archive:
            archive.extractall(staging)
        entries = list(staging.iterdir())
        content_root = entries[0] if len(entries) == 1 and entries[0].is_dir() else staging
        if dest_dir.exists():
            retired = dest_dir.with_name(temp_name(dest_dir.name, "old"))
            os.replace(dest_dir, retired)
            shutil.rmtree(retired, ignore_errors=True)  # another run may be cleaning it up as a leftover
        os.replace(content_root, dest_dir)
        _fsync_directory(dest_dir.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest_dir


def probe_size(url: str, timeout: float = 10.0) -> int | None:
    """The file's size as the server reports it, asking for one byte only; None when it cannot tell."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Range": "bytes=0-0"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if response.status == 206:
                return _total_from_content_range(response.headers.get("Content-Range"))
            length = response.headers.get("Content-Length")
            return int(length) if length is not None else None
    except (urllib.error.URLError, HTTPException, OSError, ValueError):
        return None


def unreachable_reason(url: str, timeout: float = 10.0, attempts: int = 3, pause: float = 2.0,
                       sleep: Callable[[float], None] = time.sleep) -> str | None:
    """None when the server behind `url` answers at all (any HTTP status, a 404 included), else why it could
    not be reached (no route, refused, unknown host, timed out), after `attempts` tries `pause` s apart."""
    reason = ""
    for attempt in range(attempts):
        if attempt:
            sleep(pause)
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Range": "bytes=0-0"})
        try:
            with urllib.request.urlopen(request, timeout=timeout):
                return None
        except urllib.error.HTTPError:
            return None
        except (urllib.error.URLError, HTTPException, OSError) as exc:
            cause = getattr(exc, "reason", exc)
            reason = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
    return reason


def download_file(
    url: str,
    dest: Path,
    *,
    verify: Callable[[Path], None],
    expected_size: int | None = None,
    retries: int = 5,
    timeout: float = 30.0,
    chunk_size: int = 1 << 20,
    backoff: float = 2.0,
    progress: ProgressCallback | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> DownloadResult:
    """Fetch url to dest safely; return how it went, or raise DownloadError naming the last failure.

    An existing dest that passes `verify` is kept without touching the network; one that fails it is
    deleted and fetched again. `retries` counts attempts after the first; the k-th retry waits
    `backoff * 2**(k-1)` seconds. `timeout` bounds the connect and every read. `verify(path)` raises
    VerificationError (or any ValueError) for bad content. A 4xx other than 408/425/429 fails at once.
    `sleep` waits out the backoff; a caller that must stop early passes one that raises instead.
    """
    dest = Path(dest)
    if dest.exists():
        try:
            verify(dest)
            return DownloadResult(dest, dest.stat().st_size, "verified-existing", 0, 0, False)
        except (ValueError, OSError):
            dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    tally = _TransferTally()
    last_error = ""
    for attempt in range(1, retries + 2):
        if attempt > 1:
            sleep(backoff * 2 ** (attempt - 2))
        try:
            _fetch_to_part(url, part, timeout, chunk_size, progress, tally)
            size = part.stat().st_size
            if expected_size is not None and size != expected_size:
                raise VerificationError(f"size {size} bytes, expected {expected_size}")
            verify(part)
        except _RetryableError as exc:
            last_error = str(exc)
            continue
        except ValueError as exc:
            part.unlink(missing_ok=True)
            last_error = f"verification failed: {exc}"
            continue
        except urllib.error.HTTPError as exc:
            part.unlink(missing_ok=True)
            raise DownloadError(f"HTTP {exc.code} {exc.reason} for {url}") from exc
        _fsync_file(part)
        os.replace(part, dest)
        _fsync_directory(dest.parent)
        return DownloadResult(dest, dest.stat().st_size, "downloaded", attempt, tally.bytes, tally.resumed)
    raise DownloadError(f"gave up after {retries + 1} attempts: {last_error}")


@dataclass
class _TransferTally:
    """Bytes received over all attempts of one download, and whether any attempt resumed."""

    bytes: int = 0
    resumed: bool = False


def _fetch_to_part(url: str, part: Path, timeout: float, chunk_size: int,
                   progress: ProgressCallback | None, tally: _TransferTally) -> None:
    """One HTTP attempt: append to `part` from where it stops, or rewrite it when the server ignores Range.

    Raises _RetryableError for transient trouble, urllib.error.HTTPError for permanent HTTP errors.
    """
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    written = 0
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if have and response.status == 206:
                start, total = _parse_content_range(response.headers.get("Content-Range"))
                if start != have:
                    part.unlink(missing_ok=True)
                    raise _RetryableError(f"server resumed at byte {start}, not {have}; restarting")
                mode = "ab"
                tally.resumed = True
            else:
                have, mode = 0, "wb"
                length = response.headers.get("Content-Length")
                total = int(length) if length is not None else None
            with open(part, mode) as fh:
                # read1 returns what one socket read brings, so every byte received before a stall is on
                # disk for the resume (read(n) would wait for n bytes and lose them on a timeout).
                while chunk := response.read1(chunk_size):
                    fh.write(chunk)
                    written += len(chunk)
                    tally.bytes += len(chunk)
                    if progress is not None:
                        progress(have + written, total)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == RANGE_NOT_SATISFIABLE:
            part.unlink(missing_ok=True)
            raise _RetryableError("server refused the resume range; restarting from scratch") from exc
        if exc.code in RETRYABLE_HTTP_STATUSES:
            raise _RetryableError(f"HTTP {exc.code} {exc.reason}") from exc
        raise
    except (TimeoutError, urllib.error.URLError, HTTPException, ConnectionError) as exc:
        raise _RetryableError(f"network error after {written} bytes: {exc}") from exc
    if total is not None and have + written != total:
        raise _RetryableError(f"connection closed at {have + written} of {total} bytes")


_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")


def _parse_content_range(value: str | None) -> tuple[int, int | None]:
    match = _CONTENT_RANGE.match(value or "")
    if not match:
        raise _RetryableError(f"unusable Content-Range header {value!r}")
    total = match.group(3)
    return int(match.group(1)), (None if total == "*" else int(total))


def _total_from_content_range(value: str | None) -> int | None:
    match = _CONTENT_RANGE.match(value or "")
    if not match or match.group(3) == "*":
        return None
    return int(match.group(3))


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
