"""Stage: the offline-data step. Fetch every real-data input once, verified, into the cache.

Run it on a node that HAS internet (a login or devel node), normally as `bash scripts/download_data.sh`;
compute nodes then read the cache offline. In order it:
  1. downloads the pretraining shards into base_data/ in parallel (resumable, size- and footer-verified,
     atomically renamed; already valid files are kept);
  2. downloads the CORE eval bundle zip, checks it, and extracts it atomically into eval_bundle/ (first
     removing the extraction folders of a killed run, `nanochat.leftovers`);
  3. fetches the HF datasets (SmolTalk, MMLU, GSM8K, ARC, HumanEval) into hf/ with `datasets`;
  4. trains the tokenizer with `python -m scripts.tok_train`.

Shard numbering: `--shards N` fetches N files, the training shards 0..N-2 plus the dataset's last shard
(`--val-shard`, 1822 for FineWeb-EDU 100B) as the validation shard, each under its own index
(`shard_01822.parquet`). The cache's last shard in name order is thus always the same held-out file:
fetching more shards later never turns the old validation shard into training data.

Settings: the site is `--site`, else $NANOCHAT_SITE, else NANOCHAT_SITE in .env.local. Its profile
env/<site>.env, overlaid by .env.local as the launcher does, supplies NANOCHAT_BASE_DIR, SHARDS, VOCAB_SIZE
and TOKENIZER_MAX_CHARS when the flags leave them out. Cache root: `--cache-dir`, else $NANOCHAT_BASE_DIR,
else those files, else ~/.cache/nanochat. Shard URL folder: `--base-url`, else $NANOCHAT_DATA_URL, else
FineWeb-EDU 100B; eval bundle: `--eval-bundle-url`, else $NANOCHAT_EVAL_BUNDLE_URL, else the public zip.
A site with DATA=demo, or a cache holding the demo corpus, is refused: the demo world needs no download.

Confirmation: on a terminal it asks once, showing what will be fetched and the estimated size. Without a
terminal (sbatch, nohup, CI) it never waits for input: it refuses with exit 2 unless `--yes` is given,
so an unattended run never starts a multi-gigabyte download nobody asked for.

Exit status: 0 when everything requested ended verified; 1 when some item failed (the summary lists each
failure; nothing unverified is left under a final name, only resumable `.part` files); 2 for usage errors
or a declined confirmation; 130 on Ctrl-C (partial files are kept and resume on the next run).
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from nanochat.configargs import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    require,
    run_stage,
)
from nanochat.download import (
    DownloadError,
    ProgressCallback,
    download_file,
    extract_zip_atomically,
    probe_size,
    unreachable_reason,
    verify_parquet,
    verify_zip,
)
from nanochat.leftovers import remove_leftovers
from nanochat.paths import DEFAULT_BASE_DIR, data_dir, expand_path, tokenizer_dir
from nanochat.settings_file import read_settings_file

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCAL_SETTINGS_FILE = ".env.local"

DEFAULT_SHARDS = 240

DEFAULT_SHARD_BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
FINEWEB_EDU_LAST_SHARD = 1822
DEFAULT_EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
EVAL_BUNDLE_DIR = "eval_bundle"
EVAL_BUNDLE_MARKER = "core.yaml"
HF_CACHE_DIR = "hf"
DEMO_MARKER = "DEMO"
OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


OK = "ok"
SKIPPED_VERIFIED = "skipped-verified"
SKIPPED = "skipped"
FAILED = "FAILED"


@dataclass(frozen=True)
class HFDatasetSpec:
    path: str
    name: str | None = None

    @property
    def label(self) -> str:
        return f"{self.path} ({self.name})" if self.name else self.path


HF_DATASETS = (
    HFDatasetSpec("HuggingFaceTB/smol-smoltalk"),
    HFDatasetSpec("cais/mmlu", "all"),
    HFDatasetSpec("cais/mmlu", "auxiliary_train"),
    HFDatasetSpec("openai/gsm8k", "main"),
    HFDatasetSpec("allenai/ai2_arc", "ARC-Easy"),
    HFDatasetSpec("allenai/ai2_arc", "ARC-Challenge"),
    HFDatasetSpec("openai/openai_humaneval"),
)


@dataclass
class DownloadDataConfig:
    """Fetch pretraining shards, the CORE eval bundle and the HF datasets, then train the tokenizer."""

    site: str | None = field(default=None, metadata={
        "help": "site whose env/<site>.env gives cache, SHARDS, tokenizer size (else $NANOCHAT_SITE)"})
    cache_dir: str | None = field(default=None, metadata={"help": "cache root (overrides $NANOCHAT_BASE_DIR)"})
    shards: int | None = field(default=None, metadata={
        "help": f"shard files, N-1 training + 1 validation (else SHARDS of the site, else {DEFAULT_SHARDS})"})
    val_shard: int = field(default=FINEWEB_EDU_LAST_SHARD,
                           metadata={"help": "dataset index of the validation shard (the dataset's last)"})
    base_url: str | None = field(default=None, metadata={"help": "shard URL folder (else $NANOCHAT_DATA_URL)"})
    eval_bundle_url: str | None = field(default=None,
                                        metadata={"help": "eval bundle zip URL (else $NANOCHAT_EVAL_BUNDLE_URL)"})
    workers: int = field(default=8, metadata={"help": "parallel shard downloads"})
    retries: int = field(default=5, metadata={"help": "extra attempts per file after the first"})
    timeout: float = field(default=30.0, metadata={"help": "seconds allowed for connecting and for each read"})
    backoff: float = field(default=2.0, metadata={"help": "seconds before the first retry; doubles after"})
    yes: bool = field(default=False, metadata={"help": "do not ask for confirmation (required without a TTY)"})
    skip_datasets: bool = field(default=False, metadata={"help": "do not fetch the HF datasets"})
    skip_eval_bundle: bool = field(default=False, metadata={"help": "do not fetch the CORE eval bundle"})
    skip_tokenizer: bool = field(default=False, metadata={"help": "do not train the tokenizer"})
    tokenizer_vocab_size: int | None = field(default=None, metadata={
        "help": "tok_train --vocab-size (else VOCAB_SIZE of the site, else the stage's default)"})
    tokenizer_max_chars: int | None = field(default=None, metadata={
        "help": "tok_train --max-chars (else TOKENIZER_MAX_CHARS of the site, else the stage's default)"})

    def __post_init__(self) -> None:
        require(self.shards is None or self.shards >= 2,
                "--shards must be at least 2 (one training shard plus the validation shard)")
        require(self.workers >= 1, "--workers must be at least 1")
        require(self.retries >= 0, "--retries must be 0 or more")
        require(self.timeout > 0, "--timeout must be positive")
        require(self.backoff >= 0, "--backoff must be 0 or more")


@dataclass
class ItemResult:
    """One line of the closing summary."""

    item: str
    location: Path
    size: int | None
    status: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status != FAILED


@dataclass(frozen=True)
class SiteSettings:
    """Keys from env/<site>.env overlaid by .env.local (the user's file wins), as the launcher layers them."""

    site: str | None
    values: dict[str, str]
    sources: dict[str, str]

    def get(self, key: str) -> tuple[str, str] | None:
        """(value, file it came from), or None when neither file sets the key."""
        return (self.values[key], self.sources[key]) if key in self.values else None


def read_site_settings(site: str | None, environ: Mapping[str, str], repo_root: Path = REPO_ROOT) -> SiteSettings:
    """The site is --site, else $NANOCHAT_SITE, else NANOCHAT_SITE in .env.local, else none."""
    local = _read_dotenv(repo_root / LOCAL_SETTINGS_FILE)
    site = site or environ.get("NANOCHAT_SITE") or local.get("NANOCHAT_SITE") or None
    layers = [(LOCAL_SETTINGS_FILE, local)]
    if site is not None:
        profile = repo_root / "env" / f"{site}.env"
        if not profile.is_file():
            known = ", ".join(sorted(p.stem for p in (repo_root / "env").glob("*.env"))) or "none"
            raise UsageError(f"unknown site {site!r}: no env/{site}.env (available sites: {known})")
        layers.insert(0, (f"env/{site}.env", _read_dotenv(profile)))
    values: dict[str, str] = {}
    sources: dict[str, str] = {}
    for label, layer in layers:
        for key, value in layer.items():
            if value:
                values[key], sources[key] = value, label
    return SiteSettings(site, values, sources)


def _read_dotenv(path: Path) -> dict[str, str]:
    return read_settings_file(path) if path.is_file() else {}


def resolve_cache_dir(cache_dir: str | None, settings: SiteSettings,
                      environ: Mapping[str, str]) -> tuple[Path, str]:
    """The cache root and where it came from: --cache-dir > $NANOCHAT_BASE_DIR > .env.local > site > default."""
    if cache_dir:
        return expand_path(cache_dir, environ), "--cache-dir"
    if environ.get("NANOCHAT_BASE_DIR"):
        return expand_path(environ["NANOCHAT_BASE_DIR"], environ), "$NANOCHAT_BASE_DIR"
    from_files = settings.get("NANOCHAT_BASE_DIR")
    if from_files:
        return expand_path(from_files[0], environ), from_files[1]
    return DEFAULT_BASE_DIR, "default"


def _int_setting(settings: SiteSettings, key: str, default: int) -> int:
    found = settings.get(key)
    if found is None:
        return default
    value, source = found
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{key}={value!r} in {source} is not a whole number") from None


@dataclass(frozen=True)
class ResolvedRun:
    """What this run fetches and where, after layering flags, environment, .env.local and the site file."""

    cache: Path
    cache_source: str
    site: str | None
    shards: int
    val_shard: int
    base_url: str
    bundle_url: str
    tokenizer_flags: tuple[str, ...]

    @property
    def shard_indices(self) -> list[int]:
        """Training shards 0..shards-2, then the validation shard, which sorts last by name."""
        return [*range(self.shards - 1), self.val_shard]


def resolve_run(config: DownloadDataConfig, environ: Mapping[str, str], repo_root: Path = REPO_ROOT) -> ResolvedRun:
    settings = read_site_settings(config.site, environ, repo_root)
    if settings.values.get("DATA") == "demo":
        raise UsageError(f"{settings.sources['DATA']} sets DATA=demo: the built-in demo corpus needs no download; "
                         f"pick a real-data site, or set DATA=real in {LOCAL_SETTINGS_FILE}")
    cache, cache_source = resolve_cache_dir(config.cache_dir, settings, environ)
    shards = config.shards or _int_setting(settings, "SHARDS", DEFAULT_SHARDS)
    require(shards >= 2, f"SHARDS={shards} must be at least 2 (one training shard plus the validation shard)")
    require(config.val_shard >= shards - 1,
            f"--val-shard {config.val_shard} collides with the training shards 0..{shards - 2}; "
            f"give the dataset's last shard index")
    tokenizer_flags: list[str] = []
    for flag, override, key in (("--vocab-size", config.tokenizer_vocab_size, "VOCAB_SIZE"),
                                ("--max-chars", config.tokenizer_max_chars, "TOKENIZER_MAX_CHARS")):
        value = override if override is not None else settings.values.get(key)
        if value is not None:
            tokenizer_flags += [flag, str(value)]
    return ResolvedRun(
        cache=cache, cache_source=cache_source, site=settings.site, shards=shards, val_shard=config.val_shard,
        base_url=config.base_url or environ.get("NANOCHAT_DATA_URL") or DEFAULT_SHARD_BASE_URL,
        bundle_url=config.eval_bundle_url or environ.get("NANOCHAT_EVAL_BUNDLE_URL") or DEFAULT_EVAL_BUNDLE_URL,
        tokenizer_flags=tuple(tokenizer_flags))


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def shard_url(base_url: str, index: int) -> str:
    return f"{base_url.rstrip('/')}/{shard_name(index)}"


def is_valid(path: Path, verify: Callable[[Path], None]) -> bool:
    if not path.is_file():
        return False
    try:
        verify(path)
    except (ValueError, OSError):
        return False
    return True


def eval_bundle_present(cache: Path) -> bool:
    return (cache / EVAL_BUNDLE_DIR / EVAL_BUNDLE_MARKER).is_file()


def human_size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "?"
    if num_bytes < 1000:
        return f"{num_bytes} B"
    size = num_bytes / 1000
    for unit in ("KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class _Interrupted(Exception):
    """Raised inside a worker's progress callback to abandon its download after Ctrl-C."""


def _byte_progress(bar: tqdm, stop: threading.Event | None = None) -> ProgressCallback:
    """A download_file progress callback that drives `bar` and aborts the transfer once `stop` is set."""

    def progress(done: int, total: int | None) -> None:
        if stop is not None and stop.is_set():
            raise _Interrupted
        if done < bar.n or (total is not None and bar.total != total):
            bar.reset(total=total)
        bar.update(done - bar.n)

    return progress


def _stoppable_sleep(stop: threading.Event) -> Callable[[float], None]:
    """A download_file backoff wait that ends at once, abandoning the download, when `stop` is set."""

    def sleep(seconds: float) -> None:
        if stop.wait(seconds):
            raise _Interrupted

    return sleep


class _SlotBars:
    """One overall bar plus a byte bar per worker slot; tqdm hides them all when stderr is not a TTY."""

    def __init__(self, total_files: int, workers: int) -> None:
        self.overall = tqdm(total=total_files, desc="shards", unit="file", position=0, disable=None)
        self.stop = threading.Event()
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(1, workers + 1):
            self._free.put(slot)

    def run(self, name: str, work: Callable[[ProgressCallback], Any]) -> Any:
        slot = self._free.get()
        bar = tqdm(desc=name, unit="B", unit_scale=True, position=slot, leave=False, disable=None)
        try:
            return work(_byte_progress(bar, self.stop))
        finally:
            bar.close()
            self._free.put(slot)

    def finished(self, line: str) -> None:
        self.overall.update(1)
        self.overall.write(line, file=sys.stderr)

    def close(self) -> None:
        self.overall.close()


def download_shards(indices: Sequence[int], base_url: str, directory: Path,
                    config: DownloadDataConfig) -> list[ItemResult]:
    bars = _SlotBars(len(indices), config.workers)

    def fetch(index: int) -> ItemResult:
        dest = directory / shard_name(index)
        try:
            result = bars.run(dest.name, lambda progress: download_file(
                shard_url(base_url, index), dest, verify=verify_parquet, retries=config.retries,
                timeout=config.timeout, backoff=config.backoff, progress=progress,
                sleep=_stoppable_sleep(bars.stop)))
        except DownloadError as exc:
            return ItemResult(dest.name, dest, None, FAILED, str(exc))
        status = SKIPPED_VERIFIED if result.status == "verified-existing" else OK
        detail = "resumed" if result.resumed else ""
        return ItemResult(dest.name, dest, result.size, status, detail)

    results: list[ItemResult] = []
    pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="shard")
    try:
        pending = {pool.submit(fetch, index) for index in indices}
        while pending:
            # A short timeout keeps the main thread waking up: Ctrl-C may be delivered to a worker thread,
            # and Python raises KeyboardInterrupt only once the main thread runs again.
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            for future in done:
                item = future.result()
                results.append(item)
                size = human_size(item.size) if item.size is not None else ""
                bars.finished(f"[{len(results)}/{len(indices)}] {item.item}: {item.status} {size} {item.detail}")
    except KeyboardInterrupt:
        bars.stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)
        bars.close()
    return sorted(results, key=lambda r: r.item)


def download_eval_bundle(url: str, cache: Path, config: DownloadDataConfig) -> ItemResult:
    target = cache / EVAL_BUNDLE_DIR
    for leftover in remove_leftovers(cache, EVAL_BUNDLE_DIR):
        print(f"removed {cache / leftover}: left by a killed run", file=sys.stderr, flush=True)
    if eval_bundle_present(cache):
        return ItemResult("CORE eval bundle", target, tree_size(target), SKIPPED_VERIFIED)
    archive = cache / "eval_bundle.zip"
    with tqdm(desc=archive.name, unit="B", unit_scale=True, disable=None) as bar:
        try:
            download_file(url, archive, verify=verify_zip, retries=config.retries, timeout=config.timeout,
                          backoff=config.backoff, progress=_byte_progress(bar))
        except DownloadError as exc:
            return ItemResult("CORE eval bundle", target, None, FAILED, str(exc))
    extract_zip_atomically(archive, target)
    archive.unlink()
    if not eval_bundle_present(cache):
        shutil.rmtree(target)
        return ItemResult("CORE eval bundle", target, None, FAILED,
                          f"the archive holds no {EVAL_BUNDLE_MARKER}; is --eval-bundle-url right?")
    return ItemResult("CORE eval bundle", target, tree_size(target), OK)


def download_hf_datasets(specs: Sequence[HFDatasetSpec], hf_dir: Path,
                         load: Callable[..., Any] | None = None) -> list[ItemResult]:
    """Fetch each dataset into hf_dir; one failure is reported and does not stop the others."""
    if load is None:
        from datasets import load_dataset as load
    results = []
    for spec in specs:
        print(f"fetching {spec.label} ...", file=sys.stderr, flush=True)
        try:
            dataset = load(spec.path, spec.name, cache_dir=str(hf_dir))
        except Exception as exc:  # any failure of one dataset is reported; the others still run
            first_line = next(iter(str(exc).splitlines()), "")
            results.append(ItemResult(spec.label, hf_dir, None, FAILED, f"{type(exc).__name__}: {first_line}"))
            continue
        files = {Path(f["filename"]) for split_files in dataset.cache_files.values() for f in split_files}
        size = sum(p.stat().st_size for p in files if p.is_file())
        results.append(ItemResult(spec.label, hf_dir, size, OK))
    return results


def train_tokenizer(cache: Path, flags: Sequence[str]) -> ItemResult:
    command = [sys.executable, "-m", "scripts.tok_train", *flags]
    print(f"training the tokenizer: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    completed = subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, "NANOCHAT_BASE_DIR": str(cache)})
    target = tokenizer_dir(cache)
    if completed.returncode != 0:
        return ItemResult("tokenizer", target, None, FAILED, f"scripts.tok_train exited {completed.returncode}")
    return ItemResult("tokenizer", target, tree_size(target), OK)


@dataclass
class Plan:
    """What a run will fetch, worked out from the cache before anything is downloaded."""

    missing_shards: list[int]
    total_shards: int
    eval_bundle: bool
    datasets: bool
    tokenizer: bool

    @property
    def needs_network(self) -> bool:
        return bool(self.missing_shards) or self.eval_bundle or self.datasets


def make_plan(config: DownloadDataConfig, run: ResolvedRun) -> Plan:
    directory = data_dir(run.cache)
    missing = [i for i in run.shard_indices if not is_valid(directory / shard_name(i), verify_parquet)]
    return Plan(missing, run.shards, not config.skip_eval_bundle and not eval_bundle_present(run.cache),
                not config.skip_datasets, not config.skip_tokenizer)


def describe_plan(plan: Plan, run: ResolvedRun, timeout: float) -> str:
    cache, base_url, bundle_url = run.cache, run.base_url, run.bundle_url
    lines = [f"cache: {cache}"]
    if plan.missing_shards:
        one_shard = probe_size(shard_url(base_url, plan.missing_shards[0]), timeout)
        estimate = f"about {human_size(one_shard * len(plan.missing_shards))}" if one_shard else "size unknown"
        lines.append(f"  {len(plan.missing_shards)} of {plan.total_shards} shards from {base_url} ({estimate})")
    else:
        lines.append(f"  all {plan.total_shards} shards already present and valid")
    if plan.eval_bundle:
        lines.append(f"  CORE eval bundle from {bundle_url} ({human_size(probe_size(bundle_url, timeout))})")
    if plan.datasets:
        lines.append(f"  HF datasets into {cache / HF_CACHE_DIR} (size not estimated): "
                     + ", ".join(spec.label for spec in HF_DATASETS))
    if plan.tokenizer:
        lines.append(f"  then train the tokenizer: python -m scripts.tok_train {' '.join(run.tokenizer_flags)}")
    return "\n".join(lines)


def confirm(description: str) -> bool:
    print(f"About to download:\n{description}", file=sys.stderr, flush=True)
    try:
        answer = input("Proceed? [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def format_summary(results: Sequence[ItemResult], cache: Path) -> str:
    """The closing table; good shards collapse into one row per status, every failure gets its own row."""
    rows: list[tuple[str, str, str, str]] = []
    shard_results = [r for r in results if r.item.startswith("shard_")]
    for status in (OK, SKIPPED_VERIFIED):
        group = [r for r in shard_results if r.status == status]
        if group:
            size = sum(r.size or 0 for r in group)
            rows.append((f"{len(group)} pretraining shards", _relative(group[0].location.parent, cache),
                         human_size(size), status))
    for r in results:
        if r.item.startswith("shard_") and r.ok:
            continue
        status = f"{r.status}: {r.detail}" if r.detail else r.status
        rows.append((r.item, _relative(r.location, cache), human_size(r.size) if r.size is not None else "-",
                     status))
    header = ("item", "location", "size", "status")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    lines = [f"cache: {cache}"]
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
    return "\n".join(lines)


def _relative(path: Path, cache: Path) -> str:
    try:
        return str(path.relative_to(cache)) + ("/" if path.is_dir() else "")
    except ValueError:
        return str(path)


def _check_writable(cache: Path) -> None:
    """Create the cache and a file in it now, so a read-only or missing filesystem is one line, not a traceback."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=cache).close()
    except OSError as exc:
        raise UsageError(f"cannot write to the cache {cache} ({exc.strerror or exc}): pass --cache-dir DIR or set "
                         f"NANOCHAT_BASE_DIR to a writable folder") from None


def _check_online_allowed(config: DownloadDataConfig) -> None:
    if config.skip_datasets:
        return
    for name in OFFLINE_ENV_VARS:
        value = os.environ.get(name, "")
        require(value.lower() not in ("1", "true", "yes", "on"),
                f"{name}={value} forbids fetching the HF datasets; unset it on this internet node "
                f"(or pass --skip-datasets)")


def unreachable_server(plan: Plan, run: ResolvedRun, timeout: float) -> str | None:
    """The error line when a server the plan needs cannot be reached at all (an offline node, a wrong URL),
    checked before any download so that every file's retries do not fail one by one for most of an hour."""
    needed = ([run.base_url] if plan.missing_shards else []) + ([run.bundle_url] if plan.eval_bundle else [])
    servers = dict.fromkeys(f"{part.scheme}://{part.netloc}/" for part in map(urllib.parse.urlsplit, needed))
    for server in servers:  # the server's root: any HTTP answer will do, and no file's download is disturbed
        reason = unreachable_reason(server, timeout)
        if reason is not None:
            return (f"error: cannot reach {server} ({reason}); nothing was downloaded. Run this on a node with "
                    "internet access (a login node; compute nodes are often offline), or point --base-url / "
                    "--eval-bundle-url at a reachable mirror")
    return None


def fetch_everything(config: DownloadDataConfig, run: ResolvedRun) -> list[ItemResult]:
    """Steps 1-4 in order; one result per item, skipped steps included so the summary shows them."""
    cache = run.cache
    results = download_shards(run.shard_indices, run.base_url, data_dir(cache), config)
    if config.skip_eval_bundle:
        results.append(ItemResult("CORE eval bundle", cache / EVAL_BUNDLE_DIR, None, SKIPPED, "--skip-eval-bundle"))
    else:
        results.append(download_eval_bundle(run.bundle_url, cache, config))
    if config.skip_datasets:
        results.append(ItemResult("HF datasets", cache / HF_CACHE_DIR, None, SKIPPED, "--skip-datasets"))
    else:
        results += download_hf_datasets(HF_DATASETS, cache / HF_CACHE_DIR)
    if config.skip_tokenizer:
        results.append(ItemResult("tokenizer", tokenizer_dir(cache), None, SKIPPED, "--skip-tokenizer"))
    elif all(r.ok for r in results if r.item.startswith("shard_")):
        results.append(train_tokenizer(cache, run.tokenizer_flags))
    else:
        results.append(ItemResult("tokenizer", tokenizer_dir(cache), None, FAILED,
                                  "not trained: some shards failed to download"))
    return results


def main(config: DownloadDataConfig) -> int:
    run = resolve_run(config, os.environ, REPO_ROOT)
    require(not (run.cache / DEMO_MARKER).exists(),
            f"{run.cache} holds the built-in demo corpus ({DEMO_MARKER} marker); choose a real-data cache "
            f"with --cache-dir or NANOCHAT_BASE_DIR")
    _check_writable(run.cache)
    _check_online_allowed(config)
    site_note = f", site {run.site}" if run.site else ""
    print(f"cache: {run.cache} (from {run.cache_source}{site_note}); {run.shards} shards", file=sys.stderr, flush=True)

    plan = make_plan(config, run)
    if plan.needs_network and not config.yes:
        if not sys.stdin.isatty():
            raise UsageError("stdin is not a terminal, so nothing can be confirmed: pass --yes to download "
                             "without asking")
        if not confirm(describe_plan(plan, run, config.timeout)):
            print("cancelled; nothing downloaded", file=sys.stderr)
            return EXIT_USAGE

    unreachable = unreachable_server(plan, run, config.timeout)
    if unreachable is not None:
        print(unreachable, file=sys.stderr, flush=True)
        return EXIT_ERROR
    try:
        results = fetch_everything(config, run)
    except KeyboardInterrupt:
        print("\ninterrupted: partial downloads stay as .part files and resume when you run the same command "
              "again", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED

    print("\n" + format_summary(results, run.cache), flush=True)
    failures = [r for r in results if not r.ok]
    if failures:
        print(f"\n{len(failures)} item(s) FAILED: " + ", ".join(r.item for r in failures)
              + ". Run the same command again: verified files are kept, partial ones resume.", flush=True)
        return EXIT_ERROR
    site_flag = f"--site {run.site} " if run.site else ""
    print(f"\nAll data verified. Next: python -m launch {site_flag}--check", flush=True)
    return EXIT_OK


def cli(argv: Sequence[str] | None = None) -> int:
    return run_stage(main, DownloadDataConfig, argv, prog="python -m scripts.download_data")


if __name__ == "__main__":
    sys.exit(cli())
