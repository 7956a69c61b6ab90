"""What the test tiers and the benchmarks share: the harness, in one package.

A tier's tests, its conftest and ``bench/`` import from here, never from
another tier (``tests/unit/test_support.py`` checks it). By module:

- :mod:`~tests.support.prereq`: skip (or in CI fail) when a prerequisite is
  missing.
- :mod:`~tests.support.timeouts`: how long the harness waits for what it starts.
- :mod:`~tests.support.bus`: a private ``dbus-daemon`` with kdlab's shipped
  policy, and :class:`~tests.support.bus.BusClient`, a synchronous dbus-next
  connection.
- :mod:`~tests.support.clients`: client programs (``kdlabctl``, ``gdbus``, any
  tool) run as the tests' uid or another, with their output checked for
  tracebacks.
- :mod:`~tests.support.daemon`: kdlabd as a subprocess, and the tally of its stops.
- :mod:`~tests.support.system`: kdlabd on the system libvirtd (the vm tier's
  and the benchmarks'), ``virsh``, bare QEMU.
- :mod:`~tests.support.testdriver`: kdlabd on libvirt's test driver with a
  pre-populated fleet (the bus tier's, and the bus benchmarks').
- :mod:`~tests.support.polkitd`: a real polkitd on a private bus.
- :mod:`~tests.support.logins`: real login users.
- :mod:`~tests.support.sshhost`: a second "host" reached over ssh: the tests'
  own sshd in a network namespace, keys and hosts.toml for login users and root.
- :mod:`~tests.support.debian`, :mod:`~tests.support.kernel_tree`: Debian's
  kernels, a busybox initramfs, a kernel tree and kdlab's minimal kernel,
  cached.
- :mod:`~tests.support.browser`: kdlab's Cockpit page served by ``kdlabctl
  web`` run by a login user, and that user's headless chromium on it (both
  inside the second host's namespace too).
- :mod:`~tests.support.relay`: a TCP port inside that namespace, reached
  from the tests' own (selenium to chromedriver there).
- :mod:`~tests.support.web`: ``kdlabctl web`` run by a login user, and
  probes of it sent by login users.
- :mod:`~tests.support.figures`: the figures table (a pytest plugin).
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
