"""The exec agent's protocol: frames between kdlabd and the guest agent.

kdlabd (``kdlabd/core/agentlink.py``) and the agent (``kdlab/agent/agent.c``)
speak it over one virtio-serial port (a byte stream, no message boundaries).
This docstring is the specification; agent.c follows it.

Frame: a 12-byte header, big-endian, then the payload::

    u32 length   payload bytes, at most MAX_PAYLOAD (65536)
    u32 session  the session it belongs to (0: the link itself)
    u16 type     FrameType
    u16 flags    0 (receivers ignore them)

Types (H: host, G: guest agent):

- HELLO (H->G, G->H), payload ``u32 version`` (VERSION). The host sends it
  first on every connection, with a random nonzero *token* in the session
  field; the agent answers HELLO with the same token. The host drops every
  byte before that answer (``HELLO_HEADER``), so leftovers of an earlier
  connection cannot confuse it. A HELLO means a new host: the agent kills
  (SIGKILL, process group) and forgets every session and drops its queued
  output. The agent also hunts for a HELLO (drops bytes until one) when it
  starts, after the port hung up and after a header with a length over
  MAX_PAYLOAD (the stream lost its framing).
- SPAWN (H->G), on a new nonzero session id the host chose: records
  ``u8 kind, u32 length, bytes`` of kinds ``Record``: ARGV (one per item,
  at least one), ENV (``K=V``), CWD, TTY (``u16 rows, u16 cols``: run on a
  pseudo-terminal, stderr merged into it), STDIN (empty; present: the host
  will send STDIN, absent: stdin is /dev/null). The child gets a session and
  process group of its own (``setsid``), the terminal as its controlling
  one, ``DEFAULT_ENV`` under the given variables, cwd ``/`` unless given.
  The agent answers STARTED (``u32 pid``) or ERROR (``u32 errno``, UTF-8
  message such as ``sh: No such file or directory``), which ends the session.
  At most MAX_SESSIONS sessions (ERROR EAGAIN beyond).
- STDOUT, STDERR (G->H): output. EOF (G->H) ``u8 stream``: that stream
  ended. With a terminal, everything is STDOUT and EOF of STDERR follows
  STARTED at once.
- EXIT (G->H) ``i32 code, i32 signal`` (code -1 when a signal killed it):
  sent once the process was reaped and both streams reached EOF (a
  background child that holds them keeps the session open, as with ssh),
  after all its output. The agent then forgets the session.
- STDIN (H->G) data; STDIN_EOF (H->G): stdin closed once written. With a
  terminal STDIN_EOF changes nothing (the terminal stays open, as with
  ``ssh -t``); Ctrl-C is the byte 0x03, or a SIGNAL.
- SIGNAL (H->G) ``i32 signo``: sent to the session's process group.
- RESIZE (H->G) ``u16 rows, u16 cols``: the terminal's new size.
- ACK (both ways) ``u8 stream, u32 bytes``: credit given back.
- CLOSE (H->G): the host forgets the session; the agent kills its process
  group (SIGKILL) and drops its data, and answers nothing.

Flow control: the agent has at most WINDOW unacknowledged bytes per output
stream per session; it stops reading that process's pipe until the host
acks what its reader consumed, so a slow reader holds back that process and
nothing else. The host has at most WINDOW unacknowledged STDIN bytes per
session; the agent acks them once written to the process (or dropped, when
the process closed its stdin). Neither side buffers more than that per
session; the agent stops reading pipes, then the port, while its outbound
buffer is full.

Frames of an unknown type, for an unknown session or with a bad payload are
ignored (a bad SPAWN is answered with ERROR EINVAL).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping, Sequence

VERSION = 1
MAX_PAYLOAD = 65536
WINDOW = 256 * 1024
MAX_SESSIONS = 64

HEADER = struct.Struct(">IIHH")
HEADER_SIZE = HEADER.size
_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
_PAIR_I32 = struct.Struct(">ii")
_PAIR_U16 = struct.Struct(">HH")
_ACK = struct.Struct(">BI")
_RECORD = struct.Struct(">BI")

DEFAULT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
}


class FrameType(enum.IntEnum):
    HELLO = 1
    SPAWN = 2
    STARTED = 3
    ERROR = 4
    STDOUT = 5
    STDERR = 6
    EOF = 7
    EXIT = 8
    STDIN = 9
    STDIN_EOF = 10
    SIGNAL = 11
    RESIZE = 12
    ACK = 13
    CLOSE = 14


class Record(enum.IntEnum):
    ARGV = 1
    ENV = 2
    CWD = 3
    TTY = 4
    STDIN = 5


class Stream(enum.IntEnum):
    STDIN = 0
    STDOUT = 1
    STDERR = 2


class ProtocolError(ValueError):
    """A frame that does not follow the protocol."""


def frame(kind: FrameType, session: int, payload: bytes = b"") -> bytes:
    """One frame: header and payload."""
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {len(payload)} bytes is over {MAX_PAYLOAD}")
    return HEADER.pack(len(payload), session, kind, 0) + payload


def parse_header(header: bytes) -> tuple[int, int, int]:
    """(length, session, type) of a header; a length over MAX_PAYLOAD is refused."""
    length, session, kind, _flags = HEADER.unpack(header)
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"frame of {length} bytes is over {MAX_PAYLOAD}")
    return length, session, kind


def hello(token: int) -> bytes:
    return frame(FrameType.HELLO, token, _U32.pack(VERSION))


def hello_header(token: int) -> bytes:
    """The header of the agent's answer to :func:`hello` with *token*."""
    return HEADER.pack(_U32.size, token, FrameType.HELLO, 0)


def _record(kind: Record, value: bytes) -> bytes:
    return _RECORD.pack(kind, len(value)) + value


def _c_string(text: str, what: str) -> bytes:
    data = text.encode()
    if b"\0" in data:
        raise ValueError(f"{what} contains a NUL byte: {text!r}")
    return data


def spawn(
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str | None,
    tty: tuple[int, int] | None,
    stdin: bool,
) -> bytes:
    """The payload of SPAWN; ValueError for what no process can be given."""
    if not argv:
        raise ValueError("the command is empty")
    records = [_record(Record.ARGV, _c_string(item, "an argument")) for item in argv]
    for key, value in env.items():
        if not key or "=" in key:
            raise ValueError(f"invalid environment variable name {key!r}")
        variable = _c_string(f"{key}={value}", "an environment variable")
        records.append(_record(Record.ENV, variable))
    if cwd is not None:
        records.append(_record(Record.CWD, _c_string(cwd, "the directory")))
    if tty is not None:
        rows, cols = tty
        records.append(_record(Record.TTY, _PAIR_U16.pack(rows, cols)))
    if stdin:
        records.append(_record(Record.STDIN, b""))
    payload = b"".join(records)
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"the command and environment are over {MAX_PAYLOAD} bytes")
    return payload


def u32(value: int) -> bytes:
    return _U32.pack(value)


def i32(value: int) -> bytes:
    return _I32.pack(value)


def size(rows: int, cols: int) -> bytes:
    return _PAIR_U16.pack(rows, cols)


def ack(stream: Stream, count: int) -> bytes:
    return _ACK.pack(stream, count)


def parse_u32(payload: bytes) -> int:
    if len(payload) != _U32.size:
        raise ProtocolError(f"expected 4 bytes, got {len(payload)}")
    value: int = _U32.unpack(payload)[0]
    return value


def parse_error(payload: bytes) -> tuple[int, str]:
    """(errno, message) of ERROR."""
    if len(payload) < _U32.size:
        raise ProtocolError("ERROR without an errno")
    number: int = _U32.unpack_from(payload)[0]
    return number, payload[_U32.size :].decode(errors="replace")


def parse_exit(payload: bytes) -> tuple[int, int]:
    """(code, signal) of EXIT."""
    if len(payload) != _PAIR_I32.size:
        raise ProtocolError(f"EXIT of {len(payload)} bytes")
    code, signo = _PAIR_I32.unpack(payload)
    return code, signo


def parse_ack(payload: bytes) -> tuple[int, int]:
    """(stream, bytes) of ACK."""
    if len(payload) != _ACK.size:
        raise ProtocolError(f"ACK of {len(payload)} bytes")
    stream, count = _ACK.unpack(payload)
    return stream, count


def parse_stream(payload: bytes) -> int:
    """The stream of EOF."""
    if len(payload) != 1:
        raise ProtocolError(f"EOF of {len(payload)} bytes")
    return payload[0]
