"""This machine's processes, read from /proc: by command line or title (Ray titles its workers
ray::...), or by session. HAProxy's housekeeping uses it; so do the tests and benchmarks that
watch Ray's workers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path


def _pids() -> Iterator[int]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            yield int(entry.name)


def cmdline(pid: int) -> list[bytes]:
    """The process's arguments ([] if it is gone or not readable)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name, so that index 3 is the session id
    and 21 the resident pages ([] if it is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def titled(prefix: bytes) -> list[int]:
    """Processes whose command line (a title, for Ray's workers) starts with `prefix`."""
    return [pid for pid in _pids() if b"\0".join(cmdline(pid)).startswith(prefix)]


def running(program: str, argument: str) -> list[int]:
    """Processes of the executable named `program` with `argument` in one of their arguments."""
    return [pid for pid in _pids() if (args := cmdline(pid)) and Path(
        args[0].decode(errors="replace")).name == program and any(
        argument.encode() in a for a in args)]


def in_sessions(*sids: int) -> list[int]:
    """Processes in these sessions."""
    found = []
    for pid in _pids():
        fields = stat(pid)
        if fields and fields[3].isdigit() and int(fields[3]) in sids:
            found.append(pid)
    return found
