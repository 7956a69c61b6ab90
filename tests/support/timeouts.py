"""How long the harness waits for the processes it starts and the calls it makes.

Each is a ceiling far above what the step normally takes: a hang fails the
test (with the process's log) instead of stalling the run. None is a timing
assertion: speed is measured in ``bench/``.
"""

from __future__ import annotations

# A dbus-daemon to print its address; polkitd, or kdlabd on libvirt's test
# driver, to own its bus name; a signalled kdlabd to be gone.
STARTUP_TIMEOUT = 15.0
# kdlabd on the system libvirtd to own its bus name (it defines and builds its
# pools first).
SYSTEM_STARTUP_TIMEOUT = 90.0
# SIGTERM to exit: kdlabd waits at most a few seconds for libvirt on its way out.
STOP_SECONDS = 10.0
# One D-Bus call of BusClient.
CALL_TIMEOUT = 15.0
# One client program (busctl, gdbus, gdb, ...) run by clients.run_tool.
TOOL_TIMEOUT = 30.0
# One kdlabctl command: on the system libvirtd a create uploads a kernel, a
# stop may wait for the guest.
CTL_TIMEOUT = 120.0
