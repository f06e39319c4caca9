"""The HumanEval sandbox: programs run in a separate, limited process that cannot reach out of its folder."""

from __future__ import annotations

import os
import time

import pytest

from nanochat.execution import check_humaneval, execute

PROMPT = 'def add(a, b):\n    """Return a + b."""\n'
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


def test_correct_program_passes_and_output_is_captured():
    result = execute("print(6 * 7)\nimport sys\nprint('oops', file=sys.stderr)")
    assert result.success and not result.timed_out and not result.memory_exceeded
    assert result.stdout == "42\n"
    assert "oops" in result.stderr
    assert result.error is None


def test_failing_assert_fails_with_the_reason():
    result = execute("assert 1 + 1 == 3, 'bad arithmetic'")
    assert not result.success
    assert "AssertionError: bad arithmetic" in result.error


def test_nonzero_exit_is_a_failure():
    result = execute("import sys\nsys.exit(4)")
    assert not result.success and result.error == "exit status 4"


def test_infinite_loop_times_out_and_is_killed():
    start = time.perf_counter()
    result = execute("while True:\n    pass\n", timeout=1.0)
    assert time.perf_counter() - start < 5
    assert result.timed_out and not result.success
    assert "timed out" in result.error


def test_sleeping_program_is_killed_at_the_wall_clock_limit():
    start = time.perf_counter()
    result = execute("import time\ntime.sleep(30)", timeout=1.0)
    assert result.timed_out and time.perf_counter() - start < 5


@pytest.mark.parametrize("program", [
    "x = bytearray(4 * 1024 ** 3)",
    "chunks = []\nwhile True:\n    chunks.append(bytearray(10 ** 7))",
])
def test_memory_hog_is_stopped(program):
    result = execute(program, timeout=5.0, memory_mb=256)
    assert result.memory_exceeded and not result.success and not result.timed_out


def test_files_can_be_written_inside_the_sandbox():
    result = execute("open('note.txt', 'w').write('hello')\nprint(open('note.txt').read())\n"
                     "import tempfile\nwith tempfile.NamedTemporaryFile('w') as fh:\n    fh.write('x')\n")
    assert result.success, result.stderr
    assert result.stdout == "hello\n"


def test_writing_outside_the_sandbox_is_blocked(tmp_path):
    target = tmp_path / "escaped.txt"
    for program in (f"open({str(target)!r}, 'w').write('x')",
                    f"from pathlib import Path\nPath({str(target)!r}).write_text('x')",
                    f"import os\nos.open({str(target)!r}, os.O_CREAT | os.O_WRONLY)",
                    f"open('../{target.name}', 'a')"):
        result = execute(program)
        assert not result.success and "PermissionError" in result.error, program
    assert not target.exists()


def test_deleting_files_is_blocked(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    for program in (f"import os\nos.remove({str(victim)!r})", f"import shutil\nshutil.rmtree({str(tmp_path)!r})"):
        result = execute(program)
        assert not result.success and "PermissionError" in result.error
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("program", [
    "import os\nos.system('echo escaped')",
    "import os\nos.popen('echo escaped')",
    "import subprocess\nsubprocess.run(['echo', 'escaped'])",
    "import os\nos.fork()",
    "import posix\nposix.system('echo escaped')",
    "import ctypes",
])
def test_shell_and_subprocesses_are_blocked(program):
    result = execute(program)
    assert not result.success
    assert "escaped" not in result.stdout


@pytest.mark.parametrize("program", [
    "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)",
    "import socket\nsocket.create_connection(('127.0.0.1', 9))",
    "import _socket\n_socket.socket()",
])
def test_sockets_are_blocked(program):
    result = execute(program)
    assert not result.success and "PermissionError" in result.error


def test_parent_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("NANOCHAT_FAKE_SECRET", "hunter2-token")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    result = execute("import os\nprint(sorted(os.environ))\nprint(os.environ.get('NANOCHAT_FAKE_SECRET'))")
    assert result.success
    assert "hunter2" not in result.stdout and "NANOCHAT_FAKE_SECRET" not in result.stdout
    assert "HTTPS_PROXY" not in result.stdout
    assert os.environ["NANOCHAT_FAKE_SECRET"] == "hunter2-token"


def test_sandbox_folder_is_removed_afterwards():
    result = execute("import os\nprint(os.getcwd())")
    assert result.success
    assert not os.path.exists(result.stdout.strip())


def test_humaneval_correct_completion_passes():
    assert check_humaneval(PROMPT, "    return a + b\n", TEST, "add").success


def test_humaneval_wrong_completion_fails():
    result = check_humaneval(PROMPT, "    return a - b\n", TEST, "add")
    assert not result.success and "AssertionError" in result.error


def test_humaneval_completion_that_exits_early_fails():
    for completion in ("    exit(0)\n", "    raise SystemExit(0)\n", "    import sys\n    sys.exit()\n"):
        result = check_humaneval(PROMPT, completion, TEST, "add")
        assert not result.success, completion


def test_humaneval_syntax_error_fails():
    result = check_humaneval(PROMPT, "    return a +\n", TEST, "add")
    assert not result.success and "SyntaxError" in result.error


def test_run_to_completion_requires_the_last_line():
    from nanochat.execution import run_to_completion

    assert run_to_completion("x = 1\nassert x == 1").success
    early = run_to_completion("import sys\nsys.exit(0)\nprint('never')")
    assert not early.success and early.error == "the program exited before its last line"
