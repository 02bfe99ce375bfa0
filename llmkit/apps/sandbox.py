"""Run untrusted Python (a model's program, for PAL and the agent's python tool) in a separate, limited process.

    result = run_python("print(sum(range(10)))", timeout=2)    # SandboxResult(status='ok', stdout='45\\n', ...)

What stops a hostile program, outermost first:

1. A separate process (`python -I -S -B`: isolated mode, no site-packages, no bytecode writes) in its own session,
   killed as a whole process group at the wall-clock timeout or when its output passes the cap.
2. rlimits set in the child before the program runs: CPU seconds, address space (memory), processes/threads
   (RLIMIT_NPROC), file size, open files, no core dumps.
3. Its own user and network namespaces (unshare(CLONE_NEWUSER | CLONE_NEWNET) through libc) where the kernel allows:
   the network namespace has no interface but a down loopback, so nothing can be reached; inside a fresh user
   namespace RLIMIT_NPROC counts only the sandbox's own processes and binds root too. When the kernel refuses
   (containers without user namespaces), the run goes on without it and `SandboxResult.protections` says so.
4. A working directory that is a fresh temporary folder, deleted afterwards, and an environment with nothing in it
   but PATH and LANG.
5. An audit hook (PEP 578, sys.addaudithook) installed before the program that refuses sockets, process creation
   (fork, exec, spawn, system, subprocess), signals to other processes, ctypes, the gc's object walks, raising
   rlimits, and file access outside the temporary folder (writes) or outside it and Python's standard library
   (reads), so /etc/passwd cannot be opened. The refusal is a PermissionError the program sees.

What it does not guarantee: an audit hook is defence in depth, not a security boundary (CPython's own docs say so:
code that can corrupt interpreter memory can remove it), and without a mount namespace the file rules rest on it
alone. Within those limits a program can still use its CPU and memory budget and write up to the file-size
limit inside its temporary folder. Use a VM or container for code you must not trust at all.
"""

from __future__ import annotations

import json
import math
import os
import selectors
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from llmkit.errors import LlmkitError

STATUSES = ("ok", "timeout", "memory", "output_limit", "error", "killed")
DEFAULT_TIMEOUT = 5.0  # seconds of wall clock
DEFAULT_MEMORY_MB = 512  # address space; Python itself takes ~30 MB of it
DEFAULT_MAX_OUTPUT = 1_000_000  # bytes of stdout, and again of stderr
MAX_PROCESSES = 8  # RLIMIT_NPROC: threads count too; effective inside the user namespace (and for non-root users)
MAX_FILE_BYTES = 16 * 2**20  # RLIMIT_FSIZE: the largest file the program may write
MAX_OPEN_FILES = 64  # RLIMIT_NOFILE
PROGRAM_FILE = "program.py"  # the program's name inside the temporary folder (tracebacks show it)

# The child's first code: read the program, put up the walls, run it. argv: program path, status pipe fd, limits
# (json). It reports the protections that took effect on the status pipe, then closes it before the program runs.
BOOTSTRAP = r'''
import json, os, resource, sys
program_path, status_fd, limits = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
with open(program_path, encoding="utf-8") as handle:
    source = handle.read()
protections = []

def unshare_network():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(0x10000000 | 0x40000000) == 0:  # CLONE_NEWUSER | CLONE_NEWNET
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            try:
                with open(f"/proc/self/{name}", "w") as handle:
                    handle.write(text)
            except OSError:  # a kernel may refuse a map; the namespaces stand without it (ids show as nobody)
                continue
        return ["user_namespace", "network_namespace"]
    if libc.unshare(0x40000000) == 0:  # CLONE_NEWNET alone, where we hold CAP_SYS_ADMIN
        return ["network_namespace"]
    return []

try:
    protections += unshare_network()
except Exception:  # no libc to call (or no /proc): run without namespaces; `protections` will not list them
    protections += []
for name in [name for name in sys.modules if name == "ctypes" or name.startswith(("ctypes.", "_ctypes"))]:
    del sys.modules[name]  # a re-import must go through the audit hook
for name, value in (("RLIMIT_CPU", limits["cpu"]), ("RLIMIT_AS", limits["memory"]), ("RLIMIT_NPROC", limits["nproc"]),
                    ("RLIMIT_FSIZE", limits["fsize"]), ("RLIMIT_NOFILE", limits["nofile"]), ("RLIMIT_CORE", 0)):
    soft, hard = (value, value + 1) if name == "RLIMIT_CPU" else (value, value)  # SIGXCPU first, then SIGKILL
    resource.setrlimit(getattr(resource, name), (soft, hard))
protections.append("rlimits")

home = os.path.realpath(os.getcwd())
readable = tuple(os.path.realpath(path) for path in [home, *limits["readable"]] if path)
BLOCKED = {"os.fork", "os.forkpty", "os.exec", "os.spawn", "os.posix_spawn", "os.system", "os.startfile",
           "subprocess.Popen", "pty.spawn", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
           "resource.setrlimit", "resource.prlimit", "sys.unraisablehook", "os.setuid", "os.chroot"}
BLOCKED_PREFIXES = ("socket.", "ctypes.", "_ctypes.")
BLOCKED_IMPORTS = {"ctypes", "_ctypes", "_posixsubprocess"}
WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
# event -> (writes, which arguments are paths); a symlink's target is checked when it is opened
PATH_EVENTS = {"os.listdir": (False, (0,)), "os.scandir": (False, (0,)), "os.chdir": (False, (0,)),
               "os.remove": (True, (0,)), "os.rename": (True, (0, 1)), "os.rmdir": (True, (0,)),
               "os.mkdir": (True, (0,)), "os.chmod": (True, (0,)), "os.chown": (True, (0,)), "os.link": (True, (0, 1)),
               "os.symlink": (True, (1,)), "os.truncate": (True, (0,)), "os.utime": (True, (0,)),
               "shutil.rmtree": (True, (0,)), "shutil.copyfile": (True, (0, 1)), "shutil.move": (True, (0, 1))}
SELF = os.getpid()

def inside(path, roots):
    if isinstance(path, int):
        return True
    if path is None:
        path = "."
    real = os.path.realpath(os.fsdecode(path))
    return any(real == root or real.startswith(root + os.sep) for root in roots)

def refuse(event, detail):
    raise PermissionError(f"sandbox: {event} is not allowed ({detail})")

def audit(event, args):
    if event in BLOCKED or event.startswith(BLOCKED_PREFIXES):
        refuse(event, "no processes, network, ctypes or rlimit changes in the sandbox")
    if event == "import" and args[0].split(".")[0] in BLOCKED_IMPORTS:
        refuse(f"import {args[0]}", "no ctypes or subprocesses in the sandbox")
    if event in ("os.kill", "os.killpg") and args[0] not in (SELF, 0):
        refuse(event, "only the program's own process may be signalled")
    if event == "open":
        path, mode, flags = args
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & WRITES)
        if not inside(path, (home,) if writes else readable):
            refuse(f"open {path!r}", "files outside the sandbox folder" + ("" if writes else " and the stdlib"))
    if event in PATH_EVENTS:
        writes, positions = PATH_EVENTS[event]
        for path in [args[i] for i in positions if i < len(args) and isinstance(args[i], (str, bytes, os.PathLike))]:
            if not inside(path, (home,) if writes else readable):
                refuse(f"{event} {path!r}", "paths outside the sandbox folder")

sys.addaudithook(audit)
protections.append("audit_hook")
os.write(status_fd, json.dumps(protections).encode())
os.close(status_fd)
del json, resource, unshare_network, limits, program_path, status_fd
namespace = {"__name__": "__main__", "__file__": "program.py", "__builtins__": __builtins__}
sys.argv = ["program.py"]
exec(compile(source, "program.py", "exec"), namespace)
'''


@dataclass(frozen=True)
class SandboxResult:
    """What a sandboxed run did. `status`: ok (exit 0), timeout (wall clock or CPU seconds), memory (MemoryError
    at the address-space limit), output_limit (stdout/stderr over the cap), error
    (nonzero exit or an uncaught exception, e.g.
    OSError 'File too large' past the file-size limit), killed (ended by another signal). `exit_code` is negative for a
    signal, None when it never ran. `protections` lists the walls that took effect (rlimits, audit_hook,
    user_namespace, network_namespace)."""

    status: str
    stdout: str
    stderr: str
    exit_code: int | None
    seconds: float
    protections: tuple[str, ...]
    detail: str  # one line saying why the status is what it is

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def run_python(code: str, timeout: float = DEFAULT_TIMEOUT, memory_mb: int = DEFAULT_MEMORY_MB,
               max_output_bytes: int = DEFAULT_MAX_OUTPUT) -> SandboxResult:
    """Run `code` as a Python program in the sandbox (module docstring) and return what happened. Raises
    LlmkitError only for bad arguments; whatever the program does comes back as a SandboxResult."""
    _check_arguments(code, timeout, memory_mb, max_output_bytes)
    limits = {"cpu": math.ceil(timeout) + 1, "memory": memory_mb * 2**20, "nproc": MAX_PROCESSES,
              "fsize": MAX_FILE_BYTES, "nofile": MAX_OPEN_FILES, "readable": _stdlib_dirs()}
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llmkit-sandbox-") as folder:
        program = Path(folder) / PROGRAM_FILE
        program.write_text(code, encoding="utf-8")
        status_read, status_write = os.pipe()
        try:
            process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", "-c", BOOTSTRAP, str(program), str(status_write), json.dumps(limits)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=folder,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, start_new_session=True, pass_fds=(status_write,))
        finally:
            os.close(status_write)
        try:
            stdout, stderr, stopped = _collect(process, start + timeout, max_output_bytes)
        finally:
            _kill_group(process.pid)
            process.wait()
            protections = _read_protections(status_read)
    seconds = time.monotonic() - start
    status, detail = _classify(process.returncode, stderr, stopped, timeout, max_output_bytes)
    return SandboxResult(status, stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace"),
                         process.returncode, seconds, protections, detail)


def _check_arguments(code: str, timeout: float, memory_mb: int, max_output_bytes: int) -> None:
    if not isinstance(code, str):
        raise LlmkitError(f"code must be a string of Python source, got {type(code).__name__}")
    if not timeout > 0:
        raise LlmkitError(f"timeout={timeout} must be > 0 seconds")
    if memory_mb < 64:
        raise LlmkitError(f"memory_mb={memory_mb} is too small for Python to start; use at least 64")
    if max_output_bytes < 1:
        raise LlmkitError(f"max_output_bytes={max_output_bytes} must be >= 1")


def _stdlib_dirs() -> list[str]:
    """Folders the program may read besides its own: the standard library and its compiled modules."""
    paths = sysconfig.get_paths()
    return sorted({paths["stdlib"], paths["platstdlib"], os.path.join(paths["platstdlib"], "lib-dynload")})


def _collect(process: subprocess.Popen, deadline: float, cap: int) -> tuple[bytes, bytes, str | None]:
    """Read stdout and stderr until both close; stop early at the deadline ("timeout") or when one passes `cap`
    bytes ("output_limit"). Returns (stdout, stderr, why it stopped early or None)."""
    buffers = {process.stdout: bytearray(), process.stderr: bytearray()}
    with selectors.DefaultSelector() as selector:
        for stream in buffers:
            selector.register(stream, selectors.EVENT_READ)
        while selector.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return bytes(buffers[process.stdout]), bytes(buffers[process.stderr]), "timeout"
            for key, _ in selector.select(left):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                buffer = buffers[key.fileobj]
                buffer += chunk
                if len(buffer) > cap:
                    del buffer[cap:]
                    return bytes(buffers[process.stdout]), bytes(buffers[process.stderr]), "output_limit"
    try:
        process.wait(max(deadline - time.monotonic(), 0))
    except subprocess.TimeoutExpired:  # closed its pipes but kept running
        return bytes(buffers[process.stdout]), bytes(buffers[process.stderr]), "timeout"
    return bytes(buffers[process.stdout]), bytes(buffers[process.stderr]), None


def _kill_group(pid: int) -> None:
    """SIGKILL the program's whole process group (it leads its own session), whatever is left of it."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return  # the group is gone already: nothing left to stop


def _read_protections(fd: int) -> tuple[str, ...]:
    try:
        text = os.read(fd, 4096).decode()
    finally:
        os.close(fd)
    try:
        return tuple(json.loads(text)) if text else ()
    except ValueError:
        return ()


def _classify(code: int | None, stderr: bytes, stopped: str | None, timeout: float, cap: int) -> tuple[str, str]:
    """(status, detail) from how the process ended."""
    if stopped == "timeout":
        return "timeout", f"still running after {timeout:g} s of wall clock; killed"
    if stopped == "output_limit":
        return "output_limit", f"wrote more than {cap:,} bytes to stdout or stderr; killed"
    if code == 0:
        return "ok", "exited with status 0"
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        if -code == signal.SIGXCPU:
            return "timeout", "used up its CPU seconds (SIGXCPU)"
        return "killed", f"killed by {name}"
    last = next((line for line in reversed(stderr.decode("utf-8", "replace").splitlines()) if line.strip()), "")
    if last.startswith("MemoryError"):
        return "memory", "ran out of its memory limit (MemoryError)"
    return "error", f"exited with status {code}" + (f": {last[:200]}" if last else "")
