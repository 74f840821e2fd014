"""Which machine and process a worker (or a submit) runs as, and whether it still lives.

A claim held by a worker on this host is taken back as soon as its process is gone;
one held from another host only once its heartbeat is stale. So "this host" must be
told apart exactly: two containers may share a hostname (or a kernel), and a
reboot reuses process ids. The host id combines the machine id, the boot id and
the pid namespace, so it names one process table for one boot, and nothing else.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
import sys

_MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")
_BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _boot_marker() -> str:
    """The kernel's boot id on Linux; elsewhere the boot time, which a reboot changes."""
    boot = _read(_BOOT_ID_FILE)
    if boot:
        return boot
    import psutil

    return f"{psutil.boot_time():.0f}"


def _pid_namespace() -> str:
    """The pid namespace (Linux): containers on one kernel each have their own."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


@functools.cache
def host_id() -> str:
    """This process table for this boot: ``HOSTNAME-<12 hex digits>``.

    The hostname is kept in front for people reading `status`; the digits are what
    tell hosts apart (machine id, boot, pid namespace).
    """
    machine = next((m for m in map(_read, _MACHINE_ID_FILES) if m), "") or str(
        __import__("uuid").getnode())
    digest = hashlib.sha256(
        "\0".join((machine, _boot_marker(), _pid_namespace(), sys.platform)).encode()
    ).hexdigest()[:12]
    return f"{socket.gethostname()}-{digest}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True


def on_this_host_and_gone(host: str, pid: int) -> bool:
    """A process recorded as ``host``/``pid`` ran here and no longer exists (or is this
    very process: a worker restarted with the same pid, as a container's first is)."""
    return host == host_id() and (pid == os.getpid() or not pid_alive(pid))
