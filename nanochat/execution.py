"""Run untrusted, model-written Python (HumanEval completions) in a separate, limited process.

`execute(program)` writes the program into a fresh temporary directory and runs it there with
`sys.executable -I` (isolated mode: no PYTHON* variables, no user site, cwd not on sys.path) under:
- a scrubbed environment: only PATH and LANG are passed on (HOME and TMPDIR point at the temporary
  directory), so tokens, proxies and every other variable of the parent stay invisible;
- resource limits set before the program starts: address space (`memory_mb`), CPU seconds, size of
  written files, no core dumps;
- a wall-clock timeout, after which the whole process group is killed;
- a prelude that runs before the program and takes away what it has no business using: socket creation,
  subprocesses, fork/exec/kill, shell commands, chmod/chown/links, shutil's tree operations, ctypes and
  multiprocessing; opening a file for writing, creating a directory, and deleting or renaming a file are
  refused outside the temporary directory. The temporary directory is deleted afterwards.

`run_to_completion(program)` additionally requires the program to reach its last line (graders use it, so an
early `exit(0)` does not pass), and `check_humaneval` builds a HumanEval problem's test script and runs it.

These guards are best effort against accidents of a small model, not against a determined attacker: a
program can reach the originals through Python's introspection. Real isolation needs an OS boundary (a
user/network/mount namespace, a container or a VM, e.g. `bwrap --unshare-all`, nsjail, or
`docker run --network none`); run evaluations of untrusted models only inside one.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

PROGRAM_FILE = "program.py"
OUTPUT_LIMIT_BYTES = 1 << 20  # the most of stdout and of stderr read back (the child may write up to the file limit)
FILE_SIZE_LIMIT_BYTES = 16 << 20
MEMORY_EXIT_CODE = 86  # the prelude exits with this when the program raised MemoryError
KEPT_ENVIRONMENT = ("PATH", "LANG")

# Runs in the child before the program: argv[1] is the sandbox directory, argv[2:5] the limits (address
# space bytes, CPU seconds, file size bytes), argv[5] the exit status that reports a MemoryError. The
# limits are set here, first thing, rather than in a `preexec_fn`, because preexec_fn can deadlock when the
# parent has threads (torch and tokenizers do), and hard limits cannot be raised again by the program.
# Everything the prelude needs later is bound to local names before the public functions are replaced.
PRELUDE = r'''
import resource, sys

_memory, _cpu, _fsize, _memory_exit_code = (int(v) for v in sys.argv[2:6])
resource.setrlimit(resource.RLIMIT_AS, (_memory, _memory))
resource.setrlimit(resource.RLIMIT_CPU, (_cpu, _cpu))
resource.setrlimit(resource.RLIMIT_FSIZE, (_fsize, _fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

import builtins, io, os, shutil, socket, traceback

SANDBOX = os.path.realpath(sys.argv[1])
with open(os.path.join(SANDBOX, "program.py"), encoding="utf-8") as fh:
    SOURCE = fh.read()
_exit = os._exit
_realpath = os.path.realpath
_open = io.open
_os_open = os.open
_mkdir = os.mkdir


def _inside(path):
    if isinstance(path, int):
        return True
    full = _realpath(os.fsdecode(os.fspath(path)))
    return full == SANDBOX or full.startswith(SANDBOX + os.sep)


def _refuse(name):
    def refused(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the sandbox")
    refused.__name__ = name
    return refused


def _guarded_open(file, mode="r", *args, **kwargs):
    if any(ch in mode for ch in "wax+") and not _inside(file):
        raise PermissionError(f"writing outside the sandbox is not allowed: {file!r}")
    return _open(file, mode, *args, **kwargs)


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _guarded_os_open(path, flags, *args, **kwargs):
    if flags & _WRITE_FLAGS and not _inside(path):
        raise PermissionError(f"writing outside the sandbox is not allowed: {path!r}")
    return _os_open(path, flags, *args, **kwargs)


def _guarded_mkdir(path, *args, **kwargs):
    if not _inside(path):
        raise PermissionError(f"creating directories outside the sandbox is not allowed: {path!r}")
    return _mkdir(path, *args, **kwargs)


def _inside_only(name, function):
    def guarded(*paths, **kwargs):
        if not all(_inside(p) for p in paths):
            raise PermissionError(f"os.{name} outside the sandbox is not allowed: {paths!r}")
        return function(*paths, **kwargs)
    guarded.__name__ = name
    return guarded


builtins.open = io.open = _guarded_open
os.open = _guarded_os_open
os.mkdir = _guarded_mkdir

import posix
for _module in (os, posix):
    for _name in ("remove", "unlink", "rmdir", "rename", "replace"):
        setattr(_module, _name, _inside_only(_name, getattr(_module, _name)))
    for _name in ("system", "popen", "fork", "forkpty", "vfork", "kill", "killpg", "execv", "execve",
                  "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnv", "spawnve", "spawnl",
                  "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp",
                  "removedirs", "renames", "truncate",
                  "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot", "link", "symlink",
                  "putenv", "unsetenv", "setuid", "seteuid", "setgid", "setegid", "setsid", "setpgid",
                  "setpriority", "plock", "chdir", "fchdir", "_exit", "abort"):
        if hasattr(_module, _name):
            setattr(_module, _name, _refuse(f"os.{_name}"))
for _name in ("rmtree", "move", "chown", "copy", "copy2", "copyfile", "copytree", "copymode", "copystat"):
    setattr(shutil, _name, _refuse(f"shutil.{_name}"))
for _name in ("socket", "socketpair", "create_connection", "create_server", "fromfd"):
    setattr(socket, _name, _refuse(f"socket.{_name}"))
import _socket
_socket.socket = _refuse("socket.socket")
for _name in ("subprocess", "_posixsubprocess", "multiprocessing", "ctypes", "_ctypes", "pty",
              "urllib.request", "http.client", "ftplib", "smtplib", "telnetlib"):
    sys.modules[_name] = None
del _module, _name

try:
    exec(compile(SOURCE, "program.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})
except MemoryError:
    traceback.print_exc()
    sys.stderr.flush()
    _exit(_memory_exit_code)
except SystemExit:
    raise
except BaseException:
    traceback.print_exc()
    sys.stderr.flush()
    _exit(1)
'''


@dataclass
class ExecutionResult:
    """What happened to one program. `success`: it ran to the end and exited 0 in time."""

    success: bool
    stdout: str
    stderr: str
    timed_out: bool = False
    memory_exceeded: bool = False
    error: str | None = None  # a one-line reason when not successful


def _scrubbed_environment(sandbox: Path) -> dict[str, str]:
    env = {name: os.environ[name] for name in KEPT_ENVIRONMENT if name in os.environ}
    env.setdefault("PATH", "/usr/bin:/bin")
    env.update({"HOME": str(sandbox), "TMPDIR": str(sandbox), "PYTHONDONTWRITEBYTECODE": "1"})
    return env


def _read_capped(path: Path) -> str:
    with open(path, "rb") as fh:
        return fh.read(OUTPUT_LIMIT_BYTES).decode("utf-8", errors="replace")


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def execute(program: str, timeout: float = 5.0, memory_mb: int = 512) -> ExecutionResult:
    """Run `program` in a fresh temporary directory in a child process with the limits described above."""
    if timeout <= 0 or memory_mb <= 0:
        raise ValueError(f"timeout and memory_mb must be positive, got {timeout}, {memory_mb}")
    sandbox = Path(tempfile.mkdtemp(prefix="nanochat_exec_")).resolve()
    try:
        (sandbox / PROGRAM_FILE).write_text(program, encoding="utf-8")
        stdout_path, stderr_path = sandbox / ".stdout", sandbox / ".stderr"
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", PRELUDE, str(sandbox), str(memory_mb * 1024 * 1024),
                 str(math.ceil(timeout) + 1), str(FILE_SIZE_LIMIT_BYTES), str(MEMORY_EXIT_CODE)],
                cwd=sandbox, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=_scrubbed_environment(sandbox),
                start_new_session=True, close_fds=True)
            timed_out = False
            try:
                returncode = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc.pid)
                returncode = proc.wait()
            _kill_group(proc.pid)  # anything the program left running in its group
        stdout, stderr = _read_capped(stdout_path), _read_capped(stderr_path)
    finally:
        shutil.rmtree(sandbox, ignore_errors=True)
    cpu_exhausted = returncode == -signal.SIGXCPU
    memory_exceeded = returncode == MEMORY_EXIT_CODE or (returncode != 0 and "MemoryError" in stderr)
    timed_out = timed_out or cpu_exhausted
    if timed_out:
        error = f"timed out after {timeout:g} s"
    elif memory_exceeded:
        error = f"exceeded the memory limit of {memory_mb} MB"
    elif returncode < 0:
        error = f"killed by {signal.Signals(-returncode).name}"
    elif returncode != 0:
        last_line = stderr.strip().splitlines()[-1:] or [f"exit status {returncode}"]
        error = last_line[0]
    else:
        error = None
    return ExecutionResult(success=error is None, stdout=stdout, stderr=stderr, timed_out=timed_out,
                           memory_exceeded=memory_exceeded, error=error)


def run_to_completion(program: str, timeout: float = 5.0, memory_mb: int = 512) -> ExecutionResult:
    """Run a test script; `success` means it exited 0 *after reaching its last line*.

    A random token is printed after the program's last statement, so a program that exits early with
    status 0 (exit(0), sys.exit(), os._exit) cannot pass.
    """
    token = secrets.token_hex(16)
    result = execute(f"{program}\nprint({token!r})\n", timeout=timeout, memory_mb=memory_mb)
    finished = token in result.stdout
    result.stdout = result.stdout.replace(token + "\n", "")
    if result.success and not finished:
        result.success = False
        result.error = "the program exited before its last line"
    return result


def check_humaneval(prompt: str, completion: str, test: str, entry_point: str, timeout: float = 5.0,
                    memory_mb: int = 512) -> ExecutionResult:
    """Run a HumanEval problem's tests on `prompt + completion`; `success` means every assert passed."""
    program = f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"
    return run_to_completion(program, timeout=timeout, memory_mb=memory_mb)
