"""What kdlabd's objects are to kdlabctl: read-only records of their properties.

A record's fields are its object's D-Bus properties in snake_case
(``MemoryMiB`` is ``memory_mib``): ``--json`` prints them under these names.
States are :mod:`kdlab.states`' enums, arrays and structs are tuples.

The records are plain classes, not dataclasses: ``kdlabctl list`` makes them
on every run, and importing :mod:`dataclasses` (which imports :mod:`inspect`)
costs more than the call to kdlabd does. :class:`Record` reads each field's
kind from its annotation, once per class.
"""

from __future__ import annotations

import re

from kdlab.states import JobState, StopCause, VMState

TYPE_CHECKING = False  # importing typing costs more than a listing
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any, ClassVar, Self, dataclass_transform
else:

    def dataclass_transform(**_options: object) -> Callable[[type], type]:
        """For type checkers only: records' constructors take their fields."""
        return lambda cls: cls


# A word is a plural acronym (VCPUs), a capitalised word that may end in one
# capital (MemoryMiB: Memory, MiB), or an acronym (UUID, APIRevision: API).
_WORD = re.compile(
    r"[A-Z]+s(?![a-z])|[A-Z]?[a-z0-9]+(?:[A-Z](?![a-z]))?|[A-Z]+(?![a-z])"
)
_ENUMS = {"VMState": VMState, "JobState": JobState, "StopCause": StopCause}


def snake(name: str) -> str:
    """``MemoryMiB`` -> ``memory_mib``: a D-Bus property name as a field name."""
    return "_".join(_WORD.findall(name)).lower()


def _same(value: object) -> object:
    return value


def _pairs(value: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """A dict property (``a{ss}``) as its pairs, sorted by key."""
    return tuple(sorted(value.items()))


def _kind(annotation: str) -> Callable[[Any], Any]:
    """How a field annotated *annotation* is made from its property's value."""
    if annotation in _ENUMS:
        return _ENUMS[annotation]
    if annotation == "Shares":
        return _pairs
    if annotation.startswith(("tuple[", "Diagnosis")):
        return tuple
    return _same


# A kdlabd older than this kdlabctl (upgraded, not yet restarted) lacks the
# newer properties: their fields read as "nothing" rather than failing. VM and
# job states have no such value; every kdlabd has them.
_NOTHING: dict[str, object] = {
    "str": "",
    "int": 0,
    "float": 0.0,
    "bool": False,
    "Diagnosis": ("", "", "", ""),
    "StopCause": StopCause.NONE,
    "Shares": {},  # read as () (see _pairs)
}


def _nothing(annotation: str) -> object:
    return () if annotation.startswith("tuple[") else _NOTHING.get(annotation)


@dataclass_transform(kw_only_default=True, frozen_default=True)
class Record:
    """A read-only record of one object's properties (its annotated fields)."""

    _kinds: ClassVar[dict[str, Callable[[Any], Any]]] = {}
    _missing: ClassVar[dict[str, object]] = {}

    def __init_subclass__(cls) -> None:
        hints = cls.__annotations__
        cls._kinds = {name: _kind(hint) for name, hint in hints.items()}
        cls._missing = {
            name: _nothing(hint)
            for name, hint in hints.items()
            if _nothing(hint) is not None
        }

    def __init__(self, **fields: Any) -> None:
        if fields.keys() != self._kinds.keys():
            wrong = sorted(fields.keys() ^ self._kinds.keys())
            raise TypeError(f"{type(self).__name__}: wrong fields {wrong}")
        self.__dict__.update(fields)

    @classmethod
    def from_properties(cls, props: Mapping[str, Any]) -> Self:
        """The record of *props* (values unwrapped): enums for states, tuples
        for arrays and structs; a property the object lacks reads as nothing
        (an older kdlabd)."""
        values = cls._missing | {snake(key): value for key, value in props.items()}
        return cls(**{name: kind(values[name]) for name, kind in cls._kinds.items()})

    def fields(self) -> dict[str, Any]:
        """The fields by name, in their order."""
        return {name: self.__dict__[name] for name in self._kinds}

    def replace(self, **changes: Any) -> Self:
        """A copy with *changes*."""
        return type(self)(**(self.fields() | changes))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash(tuple(self.fields().values()))

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={value!r}" for name, value in self.fields().items())
        return f"{type(self).__name__}({shown})"


# The Diagnosis property: (code, severity, cause, fix); four "" when nothing.
Diagnosis = tuple[str, str, str, str]
# One of the Checkpoints: (tag, created usec, memory bytes, boot (Booted),
# kernel SHA-256).
Checkpoint = tuple[str, int, int, int, str]
# The Shares property: (tag, the owner's directory) pairs, sorted by tag.
Shares = tuple[tuple[str, str], ...]


class VM(Record):
    """An ``org.kdlab.Kdlab1.VM`` object's properties."""

    name: str
    state: VMState
    uuid: str
    owner: int
    cmdline: str
    memory_mib: int
    vcpus: int
    accel: str
    created: int
    gdb_stub: str
    waiting_for_debugger: bool
    kernel_release: str
    vmlinux: str
    kernel_path: str
    tree: str
    diagnosis: Diagnosis
    booted: int  # the current or last boot's identity (µs); 0: none
    last_stop: StopCause
    on_panic: str
    latest_dump: str
    checkpoints: tuple[Checkpoint, ...]
    run: str  # "", "record" or "replay" (kdlab.wire.RUN_*)
    run_recording: str  # its recording's path; "/" (or "" before kdlabd 8): none
    # kdlab's initramfs it boots, by mode (kdlab.kernel.initramfs.MODE_*); "":
    # the caller's own initrd, none, or a kdlabd before APIRevision 9.
    initramfs: str
    shares: Shares  # (tag, the owner's directory), by tag


class Image(Record):
    """An ``org.kdlab.Kdlab1.Image`` object's properties."""

    name: str
    format: str
    capacity: int
    allocation: int
    owner: int
    used_by: tuple[str, ...]


class Job(Record):
    """An ``org.kdlab.Kdlab1.Job`` object's properties."""

    id: int
    kind: str
    target: str
    owner: int
    progress: float
    status: str
    state: JobState
    error: str  # the D-Bus error name of a failure, else ""


class Dump(Record):
    """An ``org.kdlab.Kdlab1.Dump`` object's properties."""

    id: str
    vm: str
    vmuuid: str
    owner: int
    kernel_release: str
    build_id: str
    vmlinux_hint: str
    reason: str
    headline: str
    problem: str
    created: int
    size: int
    format: str
    vmcoreinfo: bool
    state: str


class Recording(Record):
    """An ``org.kdlab.Kdlab1.Recording`` object's properties."""

    id: str
    vm: str
    vmuuid: str
    owner: int
    kernel_release: str
    cmdline: str
    qemu: str
    instructions: int
    seconds: float
    ended: str  # "" while recording, else kdlab.wire.RECORDING_ENDED_*
    truncated: bool
    created: int
    size: int
    state: str  # kdlab.wire.RECORDING_STATE_*
