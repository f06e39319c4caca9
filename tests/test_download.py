"""The offline-data step against a local HTTP server that misbehaves on purpose, one fault per path."""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.configargs import parse_config
from nanochat.download import (
    DownloadError,
    VerificationError,
    download_file,
    extract_zip_atomically,
    part_path,
    probe_size,
    unreachable_reason,
    verify_parquet,
    verify_zip,
)
from scripts import download_data
from scripts.download_data import DownloadDataConfig, HFDatasetSpec, cli

REPO_ROOT = Path(__file__).resolve().parents[1]
CLIENT_TIMEOUT = 0.5
STALL_SECONDS = 2.0


def parquet_bytes(seed: int, rows: int = 200, column: str = "text") -> bytes:
    texts = [f"document {seed}-{i}: " + "lorem ipsum dolor sit amet " * (3 + (seed + i) % 5) for i in range(rows)]
    buffer = io.BytesIO()
    pq.write_table(pa.table({column: texts}), buffer, compression="NONE", row_group_size=50)
    return buffer.getvalue()


def zip_bytes(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return buffer.getvalue()


@dataclass
class Fault:
    """Misbehaviour for the next `times` requests of one path: truncate, corrupt, stall or status."""

    kind: str
    times: int = 1
    status: int = 500


class FaultyServer:
    def __init__(self, files: dict[str, bytes], range_support: bool = True) -> None:
        self.files = files
        self.range_support = range_support
        self.faults: dict[str, Fault] = {}
        self.requests: list[tuple[str, str | None]] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                try:
                    server.handle(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        range_header = request.headers.get("Range")
        with self._lock:
            self.requests.append((request.path, range_header))
            fault = self.faults.get(request.path)
            active = fault is not None and fault.times > 0
            if active:
                fault.times -= 1
        body = self.files.get(request.path)
        if body is None:
            request.send_error(404)
            return
        if active and fault.kind == "status":
            request.send_error(fault.status)
            return
        if active and fault.kind == "corrupt":
            body = body[:-8] + b"GARBAGE!"
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header or "")
        if match and self.range_support:
            start = int(match.group(1))
            end = int(match.group(2)) + 1 if match.group(2) else len(body)
            if start >= len(body):
                request.send_error(416)
                return
            request.send_response(206)
            request.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(body)}")
            payload = body[start:end]
        else:
            request.send_response(200)
            payload = body
        request.send_header("Content-Length", str(len(payload)))
        request.end_headers()
        if active and fault.kind == "truncate":
            request.wfile.write(payload[: len(payload) // 2])
            return
        if active and fault.kind == "stall":
            request.wfile.write(payload[: len(payload) // 2])
            request.wfile.flush()
            time.sleep(STALL_SECONDS)
            request.wfile.write(payload[len(payload) // 2:])
            return
        request.wfile.write(payload)

    def count(self, path: str) -> int:
        return sum(1 for p, _ in self.requests if p == path)

    def __enter__(self) -> FaultyServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


SHARD = parquet_bytes(0)
BUNDLE = zip_bytes({"eval_bundle/core.yaml": "tasks: []\n", "eval_bundle/eval_data/a.jsonl": '{"q": 1}\n'})


@pytest.fixture
def server():
    files = {f"/shard_{i:05d}.parquet": parquet_bytes(i) for i in (0, 1, 2, 9)}
    files["/eval_bundle.zip"] = BUNDLE
    files["/notext.parquet"] = parquet_bytes(5, column="body")
    with FaultyServer(files) as srv:
        yield srv


def fetch(srv: FaultyServer, name: str, dest: Path, **kwargs):
    options = {"verify": verify_parquet, "retries": 3, "timeout": CLIENT_TIMEOUT, "backoff": 0.01,
               "chunk_size": 1024}
    options.update(kwargs)
    return download_file(f"{srv.url}/{name}", dest, **options)


def assert_no_partials(directory: Path) -> None:
    assert not list(directory.rglob("*.part"))


def test_fresh_download_then_second_call_touches_nothing(server, tmp_path):
    dest = tmp_path / "shard_00000.parquet"
    seen = []
    first = fetch(server, "shard_00000.parquet", dest, progress=lambda done, total: seen.append((done, total)))
    assert (first.status, first.attempts) == ("downloaded", 1)
    assert dest.read_bytes() == server.files["/shard_00000.parquet"]
    assert seen[-1] == (len(dest.read_bytes()), len(dest.read_bytes()))
    second = fetch(server, "shard_00000.parquet", dest)
    assert second.status == "verified-existing"
    assert server.count("/shard_00000.parquet") == 1
    assert_no_partials(tmp_path)


def test_transient_500s_are_retried(server, tmp_path):
    server.faults["/shard_00001.parquet"] = Fault("status", times=2, status=500)
    result = fetch(server, "shard_00001.parquet", tmp_path / "s.parquet")
    assert result.attempts == 3
    assert (tmp_path / "s.parquet").read_bytes() == server.files["/shard_00001.parquet"]


def test_404_fails_at_once_without_leaving_files(server, tmp_path):
    with pytest.raises(DownloadError, match="404"):
        fetch(server, "shard_00077.parquet", tmp_path / "s.parquet")
    assert server.count("/shard_00077.parquet") == 1
    assert list(tmp_path.iterdir()) == []


def test_truncated_body_resumes_with_range(server, tmp_path):
    server.faults["/shard_00002.parquet"] = Fault("truncate")
    body = server.files["/shard_00002.parquet"]
    result = fetch(server, "shard_00002.parquet", tmp_path / "s.parquet")
    assert result.resumed and result.attempts == 2
    assert result.bytes_transferred == len(body)
    assert server.requests[-1] == ("/shard_00002.parquet", f"bytes={len(body) // 2}-")
    assert (tmp_path / "s.parquet").read_bytes() == body


def test_truncated_body_restarts_when_server_ignores_range(tmp_path):
    with FaultyServer({"/s.parquet": SHARD}, range_support=False) as srv:
        srv.faults["/s.parquet"] = Fault("truncate")
        result = fetch(srv, "s.parquet", tmp_path / "s.parquet")
        assert srv.requests[-1][1] is not None
    assert not result.resumed and result.attempts == 2
    assert (tmp_path / "s.parquet").read_bytes() == SHARD


def test_partial_from_an_earlier_run_is_continued(server, tmp_path):
    dest = tmp_path / "s.parquet"
    part_path(dest).write_bytes(SHARD[:1000])
    result = fetch(server, "shard_00000.parquet", dest)
    assert server.requests == [("/shard_00000.parquet", "bytes=1000-")]
    assert result.resumed and result.bytes_transferred == len(SHARD) - 1000
    assert dest.read_bytes() == SHARD


def test_complete_partial_refused_by_server_is_fetched_again(server, tmp_path):
    dest = tmp_path / "s.parquet"
    part_path(dest).write_bytes(SHARD + b"extra")
    fetch(server, "shard_00000.parquet", dest)
    assert [r for _, r in server.requests] == [f"bytes={len(SHARD) + 5}-", None]
    assert dest.read_bytes() == SHARD


def test_corrupt_download_is_deleted_and_fetched_again(server, tmp_path):
    server.faults["/shard_00000.parquet"] = Fault("corrupt")
    result = fetch(server, "shard_00000.parquet", tmp_path / "s.parquet")
    assert result.attempts == 2
    assert (tmp_path / "s.parquet").read_bytes() == SHARD


def test_always_corrupt_fails_and_keeps_nothing(server, tmp_path):
    server.faults["/shard_00000.parquet"] = Fault("corrupt", times=99)
    with pytest.raises(DownloadError, match="verification failed"):
        fetch(server, "shard_00000.parquet", tmp_path / "s.parquet", retries=2)
    assert server.count("/shard_00000.parquet") == 3
    assert list(tmp_path.iterdir()) == []


def test_missing_text_column_is_rejected(server, tmp_path):
    with pytest.raises(DownloadError, match="no 'text' column"):
        fetch(server, "notext.parquet", tmp_path / "s.parquet", retries=0)
    assert list(tmp_path.iterdir()) == []


def test_size_other_than_expected_is_rejected(server, tmp_path):
    with pytest.raises(DownloadError, match="expected"):
        fetch(server, "shard_00000.parquet", tmp_path / "s.parquet", retries=0, expected_size=len(SHARD) + 1)
    assert list(tmp_path.iterdir()) == []


def test_stalled_server_times_out_and_resumes(server, tmp_path):
    server.faults["/shard_00000.parquet"] = Fault("stall")
    started = time.monotonic()
    result = fetch(server, "shard_00000.parquet", tmp_path / "s.parquet")
    assert time.monotonic() - started < STALL_SECONDS
    assert result.attempts == 2 and result.resumed
    assert (tmp_path / "s.parquet").read_bytes() == SHARD


def test_bad_file_under_final_name_is_replaced(server, tmp_path):
    dest = tmp_path / "s.parquet"
    dest.write_bytes(SHARD[:-4] + b"XXXX")
    result = fetch(server, "shard_00000.parquet", dest)
    assert result.status == "downloaded"
    assert dest.read_bytes() == SHARD


def test_verifiers_reject_bad_content(tmp_path):
    truncated = tmp_path / "t.parquet"
    truncated.write_bytes(SHARD[: len(SHARD) // 2])
    with pytest.raises(VerificationError, match="PAR1"):
        verify_parquet(truncated)
    broken_footer = tmp_path / "f.parquet"
    broken_footer.write_bytes(SHARD[:-12] + b"\xff\xff\xff\x7f" + b"zzzz" + b"PAR1")
    with pytest.raises(VerificationError, match="footer"):
        verify_parquet(broken_footer)
    flipped = bytearray(zip_bytes({"a.txt": "hello world " * 100}))
    flipped[40] ^= 0xFF
    bad_zip = tmp_path / "b.zip"
    bad_zip.write_bytes(bytes(flipped))
    with pytest.raises(VerificationError):
        verify_zip(bad_zip)
    not_zip = tmp_path / "n.zip"
    not_zip.write_bytes(b"not a zip")
    with pytest.raises(VerificationError, match="not a valid zip"):
        verify_zip(not_zip)


def test_extract_replaces_old_folder_and_leaves_no_staging(tmp_path):
    archive = tmp_path / "bundle.zip"
    archive.write_bytes(BUNDLE)
    target = tmp_path / "eval_bundle"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    extract_zip_atomically(archive, target)
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == [
        "core.yaml", "eval_data", "eval_data/a.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle.zip", "eval_bundle"]


def test_probe_size_reads_the_total_from_one_byte(server):
    assert probe_size(f"{server.url}/eval_bundle.zip") == len(BUNDLE)
    assert server.requests == [("/eval_bundle.zip", "bytes=0-0")]
    assert probe_size(f"{server.url}/missing.zip") is None


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (the port was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_unreachable_reason_tells_a_dead_server_from_any_answer(server):
    waits = []
    assert "refused" in unreachable_reason(f"{closed_port_url()}/", timeout=2, sleep=waits.append).lower()
    assert waits == [2.0, 2.0]  # three attempts
    assert unreachable_reason(f"{server.url}/no/such/file", timeout=2) is None  # a 404 is an answer


@pytest.fixture(autouse=True)
def isolated_settings(tmp_path_factory, monkeypatch):
    """Keep the developer's own .env.local, site choice and cache variables out of these tests."""
    root = tmp_path_factory.mktemp("settings_root")
    (root / "env").mkdir()
    monkeypatch.setattr(download_data, "REPO_ROOT", root)
    for name in ("NANOCHAT_SITE", "NANOCHAT_BASE_DIR", "NANOCHAT_DATA_URL", "NANOCHAT_EVAL_BUNDLE_URL",
                 "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    return root


def resolve(root: Path, *argv: str, **environ: str):
    return download_data.resolve_run(parse_config(DownloadDataConfig, list(argv)), environ, root)


def test_settings_layering(isolated_settings):
    root = isolated_settings
    (root / "env" / "cluster.env").write_text(
        "DATA=real\nNANOCHAT_BASE_DIR=/scratch/$USER/nanochat-cache\nSHARDS=40\nVOCAB_SIZE=4096\n")
    (root / "env" / "cpu.env").write_text("DATA=demo\nNANOCHAT_BASE_DIR=~/.cache/nanochat/demo\n")

    run = resolve(root, "--site", "cluster", USER="ada")
    assert (run.cache, run.cache_source) == (Path("/scratch/ada/nanochat-cache"), "env/cluster.env")
    assert (run.shards, run.shard_indices[-2:], run.tokenizer_flags) == (40, [38, 1822], ("--vocab-size", "4096"))
    assert resolve(root, "--site", "cluster", "--cache-dir", "/a", NANOCHAT_BASE_DIR="/b").cache == Path("/a")
    assert resolve(root, "--site", "cluster", NANOCHAT_BASE_DIR="/b").cache_source == "$NANOCHAT_BASE_DIR"

    (root / ".env.local").write_text("NANOCHAT_SITE=cluster\nNANOCHAT_BASE_DIR=${HOME}/mine\nSHARDS=8\n")
    run = resolve(root, "--shards", "5", "--tokenizer-max-chars", "1000", HOME="/home/ada")
    assert (run.site, run.cache, run.cache_source) == ("cluster", Path("/home/ada/mine"), ".env.local")
    assert run.shards == 5 and run.tokenizer_flags == ("--vocab-size", "4096", "--max-chars", "1000")
    assert resolve(root, "--site", "cluster", HOME="/h").shards == 8

    (root / ".env.local").unlink()
    assert resolve(root).cache == download_data.DEFAULT_BASE_DIR
    with pytest.raises(download_data.UsageError, match="env/cpu.env sets DATA=demo"):
        resolve(root, "--site", "cpu")
    with pytest.raises(download_data.UsageError, match="available sites: cluster, cpu"):
        resolve(root, "--site", "nosuch")
    with pytest.raises(download_data.UsageError, match="--val-shard"):
        resolve(root, "--shards", "10", "--val-shard", "5")

    # a line that does not parse would silently drop the cache setting: refused, naming file and line
    (root / ".env.local").write_text("NANOCHAT_SITE=cluster\nNANOCHAT_BASE_DIR=\"/scratch/mine\n")
    with pytest.raises(download_data.UsageError, match=r"\.env\.local, line 2: cannot parse"):
        resolve(root, HOME="/h")


def script_args(srv: FaultyServer, cache: Path, *extra: str) -> list[str]:
    return ["--cache-dir", str(cache), "--base-url", srv.url, "--eval-bundle-url", f"{srv.url}/eval_bundle.zip",
            "--shards", "3", "--val-shard", "9", "--workers", "3", "--retries", "2", "--timeout", str(CLIENT_TIMEOUT),
            "--backoff", "0.01", "--skip-datasets", "--skip-tokenizer", *extra]


def test_stage_downloads_everything_then_is_idempotent(server, tmp_path, capsys):
    server.faults["/shard_00001.parquet"] = Fault("status", times=2, status=503)
    server.faults["/eval_bundle.zip"] = Fault("truncate")
    cache = tmp_path / "cache"
    assert cli(script_args(server, cache, "--yes")) == 0
    shards = sorted(p.name for p in (cache / "base_data").iterdir())
    assert shards == ["shard_00000.parquet", "shard_00001.parquet", "shard_00009.parquet"]
    assert (cache / "eval_bundle" / "core.yaml").is_file()
    assert not (cache / "eval_bundle.zip").exists()
    assert_no_partials(cache)
    assert "python -m launch --check" in capsys.readouterr().out

    requests_after_first_run = len(server.requests)
    assert cli(script_args(server, cache)) == 0, "nothing to fetch, so no confirmation is needed"
    assert len(server.requests) == requests_after_first_run
    assert "skipped-verified" in capsys.readouterr().out


def test_stage_reports_failures_and_skips_tokenizer(server, tmp_path, capsys):
    server.files["/shard_00001.parquet"] = b"PAR1 this is not parquet PAR1"
    cache = tmp_path / "cache"
    assert cli(script_args(server, cache, "--yes", "--no-skip-tokenizer")) == 1
    out = capsys.readouterr().out
    assert re.search(r"shard_00001\.parquet .*FAILED: gave up after 3 attempts", out)
    assert re.search(r"tokenizer .*FAILED: not trained", out)
    assert "2 pretraining shards" in out
    assert sorted(p.name for p in (cache / "base_data").iterdir()) == ["shard_00000.parquet", "shard_00009.parquet"]
    assert not (cache / "tokenizer").exists()


def test_stage_without_tty_or_yes_refuses_before_downloading(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert cli(script_args(server, tmp_path / "cache")) == 2
    assert "--yes" in capsys.readouterr().err
    assert server.requests == []


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("answer", "code"), [("n", 2), ("y", 0)])
def test_stage_asks_once_on_a_terminal(server, tmp_path, monkeypatch, capsys, answer, code):
    monkeypatch.setattr(sys, "stdin", _Terminal(answer + "\n"))
    assert cli(script_args(server, tmp_path / "cache")) == code
    err = capsys.readouterr().err
    assert "About to download" in err and "3 of 3 shards" in err and "CORE eval bundle from" in err
    assert ("/shard_00000.parquet", "bytes=0-0") in server.requests
    assert (tmp_path / "cache" / "base_data" / "shard_00000.parquet").exists() == (code == 0)


def test_stage_refuses_demo_cache_and_offline_mode(server, tmp_path, monkeypatch, capsys):
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "DEMO").write_text("")
    assert cli(script_args(server, demo, "--yes")) == 2
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert cli([*script_args(server, tmp_path / "cache", "--yes"), "--no-skip-datasets"]) == 2
    assert "HF_DATASETS_OFFLINE" in capsys.readouterr().err
    assert server.requests == []


def test_stage_refuses_an_unwritable_cache_in_one_line(server, tmp_path, capsys):
    """A cache under a file stands in for a read-only or missing /scratch: exit 2 and one line, no traceback."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    assert cli(script_args(server, blocker / "cache", "--yes")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write to the cache") and "--cache-dir" in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert server.requests == []


def test_stage_stops_at_once_when_the_server_cannot_be_reached(server, tmp_path, capsys, monkeypatch):
    """An offline node (or a wrong --base-url): one line and exit 1 before any file, not an hour of retries."""
    monkeypatch.setattr(download_data, "unreachable_reason",
                        lambda url, timeout: unreachable_reason(url, timeout, sleep=lambda _s: None))
    cache = tmp_path / "cache"
    dead = closed_port_url()
    args = [dead if a == server.url else a for a in script_args(server, cache, "--yes", "--retries", "5")]
    assert cli(args) == 1
    err = capsys.readouterr().err
    assert f"cannot reach {dead}/" in err and "login node" in err
    assert not (cache / "base_data").exists() or not any((cache / "base_data").iterdir())


def test_hf_dataset_failure_does_not_stop_the_others(tmp_path):
    arrow_file = tmp_path / "data.arrow"
    arrow_file.write_bytes(b"x" * 123)

    class FakeDataset:
        cache_files = {"train": [{"filename": str(arrow_file)}]}

    def load(path, name, cache_dir):
        assert cache_dir == str(tmp_path)
        if path == "broken/ds":
            raise ConnectionError("hub unreachable\nlong traceback text")
        return FakeDataset()

    specs = [HFDatasetSpec("broken/ds"), HFDatasetSpec("good/ds", "main")]
    results = download_data.download_hf_datasets(specs, tmp_path, load=load)
    assert [(r.item, r.status, r.size) for r in results] == [
        ("broken/ds", "FAILED", None), ("good/ds (main)", "ok", 123)]
    assert results[0].detail == "ConnectionError: hub unreachable"


def test_shell_script_end_to_end(server, tmp_path):
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k != "NANOCHAT_BASE_DIR"}
    env["PYTHON"] = sys.executable
    completed = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "download_data.sh"),
                                *script_args(server, cache, "--yes")],
                               cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert "All data verified. Next: python -m launch --check" in completed.stdout
    assert len(list((cache / "base_data").glob("*.parquet"))) == 3
    assert (cache / "eval_bundle" / "core.yaml").is_file()


def test_ctrl_c_stops_promptly_and_keeps_the_partial(server, tmp_path):
    server.faults["/shard_00000.parquet"] = Fault("stall", times=99)
    cache = tmp_path / "cache"
    args = [a if a != str(CLIENT_TIMEOUT) else "30" for a in script_args(server, cache, "--yes", "--workers", "1")]
    process = subprocess.Popen([sys.executable, "-m", "scripts.download_data", *args], cwd=REPO_ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    partial = cache / "base_data" / "shard_00000.parquet.part"
    deadline = time.monotonic() + 20
    while not (partial.exists() and partial.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=STALL_SECONDS + 5)
    assert process.returncode == 130, err
    assert "resume" in err
    assert partial.exists() and not (cache / "base_data" / "shard_00000.parquet").exists()


def test_ctrl_c_during_retry_backoff_stops_promptly(server, tmp_path):
    """A worker waiting out its backoff (the server is failing) must not hold Ctrl-C for the whole wait."""
    server.faults["/shard_00000.parquet"] = Fault("status", times=99, status=503)
    cache = tmp_path / "cache"
    args = [a if a != "0.01" else "30" for a in script_args(server, cache, "--yes", "--workers", "1")]
    process = subprocess.Popen([sys.executable, "-m", "scripts.download_data", *args], cwd=REPO_ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 20
    while server.count("/shard_00000.parquet") < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=40)
    assert process.returncode == 130, err
    assert time.monotonic() - started < 5
    assert server.count("/shard_00000.parquet") == 1
