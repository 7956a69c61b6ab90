"""Runs virtiofsd as an unprivileged user: ``virtiofs_exec.py ARGV...``.

It is run by path with ``python -I -S``, never imported, so it uses the
standard library only (see :mod:`kdlabctl.shares`, which runs it).

QEMU's C virtiofsd (Debian 12's ``/usr/lib/qemu/virtiofsd``) drops its
supplementary groups with ``setgroups(0, NULL)`` first thing and exits when
that fails (its fix of CVE-2022-0358, where a virtiofsd running as root kept
root's groups). Unprivileged, it runs as root of a user namespace of its
own (``unshare --map-root-user``), where the kernel refuses ``setgroups``
for good. Here that one call is made to succeed without doing anything (a
seccomp filter answers it with 0), and ARGV is executed: virtiofsd keeps
the groups its user has, so the guest sees the directory with exactly the
rights of the user who serves it, groups included. The filter only ever
makes ``setgroups`` a no-op: it grants nothing, and no process under it can
gain privileges (``no_new_privs``).
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys

_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_AUDIT_ARCH_X86_64 = 0xC000003E
_NR_SETGROUPS = 116  # x86_64
_SECCOMP_RET_ERRNO = 0x00050000  # with errno 0: the call "succeeds"
_SECCOMP_RET_ALLOW = 0x7FFF0000
# struct seccomp_data: int nr; __u32 arch; ...
_NR_OFFSET, _ARCH_OFFSET = 0, 4
_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    """One ``struct sock_filter``."""
    return struct.pack("=HBBI", code, jt, jf, k)


# setgroups of x86_64's ABI returns 0; anything else runs as it would.
PROGRAM = b"".join(
    [
        _insn(_LD_W_ABS, _ARCH_OFFSET),
        _insn(_JEQ_K, _AUDIT_ARCH_X86_64, jt=0, jf=3),
        _insn(_LD_W_ABS, _NR_OFFSET),
        _insn(_JEQ_K, _NR_SETGROUPS, jt=0, jf=1),
        _insn(_RET_K, _SECCOMP_RET_ERRNO),
        _insn(_RET_K, _SECCOMP_RET_ALLOW),
    ]
)


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def make_setgroups_a_no_op() -> None:
    """Install the filter on this process (and so on what it executes)."""
    libc = ctypes.CDLL(None, use_errno=True)
    program = ctypes.create_string_buffer(PROGRAM, len(PROGRAM))
    fprog = _Fprog(len(PROGRAM) // 8, ctypes.addressof(program))
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0):
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: virtiofs_exec.py ARGV...", file=sys.stderr)
        return 2
    try:
        make_setgroups_a_no_op()
        os.execvp(argv[0], argv)
    except OSError as err:
        print(f"kdlab virtiofs_exec: {argv[0]}: {err}", file=sys.stderr)
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
