"""Shell completion: ``kdlabctl completion bash|zsh|fish`` and ``__complete``.

The script a shell sources is a few lines that hand the words typed so far to
``kdlabctl __complete`` (a hidden command, not in the parser) on every Tab, as
cobra's programs (kubectl, gh) do. :func:`complete` walks kdlabctl's own
argparse parser over those words, so commands, options and their values come
from the parser kdlabctl runs: nothing is kept by hand, in any shell.

An argument names what it takes: ``choices``, a :class:`Names` type (a VM, an
image or a recording that exists: kdlabd is asked for the names, within
:data:`NAMES_SECONDS`, without being started, and silently nothing when it is
not there), or a metavar of :data:`PATH_METAVARS` (the shell completes file
names). ``--host`` takes the hosts of hosts.toml; with a host (typed, or
``$KDLAB_HOST``), names are asked of that host's kdlabd through a session of
its own, within :data:`HOST_NAMES_SECONDS`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from kdlabctl.names import HIDDEN, IMAGE_NAME, RECORDING_ID, VM_NAME, HostSpec, Names

if TYPE_CHECKING:
    from kdlabctl.client import Listing

__all__ = [
    "HIDDEN",
    "IMAGE_NAME",
    "RECORDING_ID",
    "VM_NAME",
    "Completion",
    "Names",
    "complete",
]

# How long a Tab may wait for kdlabd's names: a shell that stalls is worse
# than one that offers nothing.
NAMES_SECONDS = 1.0
# The same through ssh: a connection, and kdlabctl's start on the host.
HOST_NAMES_SECONDS = 5.0
# Metavars whose value is a file (or a directory): the shell completes it.
PATH_METAVARS = {"PATH": "files", "FILE": "files", "DIR": "dirs"}


@dataclass(frozen=True)
class Completion:
    """What may come at the cursor: *words*, or file (directory) names the
    shell finds itself (*kind* ``files`` or ``dirs``)."""

    kind: Literal["words", "files", "dirs"] = "words"
    words: list[str] = field(default_factory=list)

    def lines(self) -> Iterator[str]:
        """What ``__complete`` prints: the kind, then one word a line."""
        yield self.kind
        yield from self.words


def commands(action: argparse._SubParsersAction) -> list[str]:  # type: ignore[type-arg]
    """The commands of *action* that ``--help`` lists (those with a help text)."""
    return [choice.dest for choice in action._choices_actions]


def options(parser: argparse.ArgumentParser) -> list[str]:
    return [
        option
        for action in parser._actions
        if action.help != argparse.SUPPRESS
        for option in action.option_strings
    ]


def _takes_value(action: argparse.Action) -> bool:
    return bool(action.option_strings) and action.nargs != 0


def _repeats(action: argparse.Action) -> bool:
    return action.nargs in ("*", "+", argparse.REMAINDER)


@dataclass
class _Walk:
    """Where the words typed so far leave the parser."""

    parser: argparse.ArgumentParser
    bus: str | None  # --bus as typed (None: the default of where names are asked)
    host: str  # --host as typed, else $KDLAB_HOST ("": this machine)
    positional: int = 0  # positional arguments of *parser* given so far
    value_of: argparse.Action | None = None  # an option waiting for its value
    after_dashes: bool = False  # past "--": gdb's arguments
    lost: bool = False  # a word the parser does not know

    def feed(self, word: str) -> None:
        if self.value_of is not None:
            if word == "=":  # bash splits --opt=value at the "="
                return
            if self.value_of.dest == "bus":
                self.bus = word
            elif self.value_of.dest == "host":
                self.host = word
            self.value_of = None
        elif self.after_dashes or self.lost:
            return
        elif word == "--":
            self.after_dashes = True
        elif word.startswith("-") and word != "-":
            name, equals, _ = word.partition("=")
            action = self.parser._option_string_actions.get(name)
            if action is not None and _takes_value(action) and not equals:
                self.value_of = action
        else:
            self._argument(word)

    def _argument(self, word: str) -> None:
        action = self.next_positional()
        if isinstance(action, argparse._SubParsersAction):
            sub = action.choices.get(word) if word in commands(action) else None
            if sub is None:
                self.lost = True
            else:
                self.parser, self.positional = sub, 0
        elif action is None:
            self.lost = True
        elif not _repeats(action):
            self.positional += 1

    def next_positional(self) -> argparse.Action | None:
        positionals = [a for a in self.parser._actions if not a.option_strings]
        if self.positional < len(positionals):
            return positionals[self.positional]
        return None


def complete(
    parser: argparse.ArgumentParser,
    words: Sequence[str],
    bus: str,
    host: str = "",
) -> Completion:
    """What may replace the last of *words* (the words after ``kdlabctl``, the
    last one being completed, maybe empty). kdlabd is asked for names on
    *bus* here, or on *host*'s bus, unless the words hold ``--bus`` or
    ``--host``."""
    *typed, current = words or [""]
    walk = _Walk(parser, None, host)
    for word in typed:
        walk.feed(word)
    if walk.lost:
        return Completion()
    if walk.after_dashes:
        return Completion("files")
    where = Where(walk.bus or ("" if walk.host else bus), walk.host)
    if walk.value_of is not None:
        return _values(walk.value_of, current, where)
    action = walk.next_positional()
    if current.startswith("-") or action is None:
        return _matching(options(walk.parser), current)
    return _values(action, current, where)


@dataclass(frozen=True)
class Where:
    """Where kdlabd is asked for names: *bus* here, or on *host* ("" its bus)."""

    bus: str
    host: str = ""


def _values(action: argparse.Action, current: str, where: Where) -> Completion:
    if isinstance(action, argparse._SubParsersAction):
        return _matching(commands(action), current)
    if action.choices is not None:
        return _matching([str(choice) for choice in action.choices], current)
    if isinstance(action.type, Names):
        return _matching(names(where, action.type.listing), current)
    if isinstance(action.type, HostSpec):
        from kdlabctl import hosts

        return _matching(hosts.names(), current)
    kind = PATH_METAVARS.get(str(action.metavar))
    if kind == "files":
        return Completion("files")
    if kind == "dirs":
        return Completion("dirs")
    return Completion()


def _matching(candidates: Sequence[str], current: str) -> Completion:
    return Completion(
        "words", [word for word in candidates if word.startswith(current)]
    )


def names(where: Where, listing: Listing) -> list[str]:
    """The names of kdlabd's VMs, images or recordings *where* it is; none
    when kdlabd (or the bus, or the host) is not there or does not answer
    within :data:`NAMES_SECONDS` (:data:`HOST_NAMES_SECONDS` on a host)."""
    try:
        if not where.host:
            return _names(where.bus, listing)
        from kdlabctl import hosts

        host = hosts.resolve(where.host)
        with hosts.connected(host, where.bus, HOST_NAMES_SECONDS) as session:
            return _names(session.bus, listing)
    except Exception:  # a Tab says nothing about why kdlabd is not there
        return []


def _names(bus: str, listing: Listing) -> list[str]:
    from kdlabctl.client import Client, settle

    # Each step of the connection and the call waits NAMES_SECONDS at most.
    client = Client.plain(bus, timeout=NAMES_SECONDS)
    try:
        return settle(client.names(listing))
    finally:
        client.disconnect()


def main(parser: argparse.ArgumentParser, words: Sequence[str]) -> int:
    """``kdlabctl __complete [--] WORDS...``: print :func:`complete`'s answer."""
    from kdlabctl.cli import local_bus

    if words[:1] == ["--"]:
        words = words[1:]
    host = os.environ.get("KDLAB_HOST", "")
    print("\n".join(complete(parser, words, local_bus(), host).lines()))
    return 0


# Each script hands the words up to the cursor (the current one included, maybe
# empty) to `kdlabctl __complete` as typed and reads back the kind of answer
# and the words.
SCRIPTS = {
    "bash": r"""# bash completion for kdlabctl; written by `kdlabctl completion bash`.
_kdlabctl() {
    local IFS=$'\n'
    local -a reply
    reply=($(command "${COMP_WORDS[0]}" __complete -- \
        "${COMP_WORDS[@]:1:COMP_CWORD}" 2>/dev/null))
    case ${reply[0]-} in
    files) compopt -o filenames 2>/dev/null
        COMPREPLY=($(compgen -f -- "${COMP_WORDS[COMP_CWORD]}")) ;;
    dirs) compopt -o filenames 2>/dev/null
        COMPREPLY=($(compgen -d -- "${COMP_WORDS[COMP_CWORD]}")) ;;
    *) COMPREPLY=("${reply[@]:1}") ;;
    esac
}
complete -F _kdlabctl kdlabctl
""",
    "zsh": r"""#compdef kdlabctl
# zsh completion for kdlabctl; written by `kdlabctl completion zsh`.
_kdlabctl() {
    local -a reply
    reply=("${(@f)$(command ${words[1]} __complete -- \
        "${(@)words[2,CURRENT]}" 2>/dev/null)}")
    case $reply[1] in
    files) _files ;;
    dirs) _files -/ ;;
    *) compadd -- "${(@)reply[2,-1]}" ;;
    esac
}
compdef _kdlabctl kdlabctl
""",
    "fish": r"""# fish completion for kdlabctl; written by `kdlabctl completion fish`.
function __kdlabctl_complete
    set -l typed (commandline -opc)
    set -l reply (command $typed[1] __complete -- $typed[2..-1] \
        (commandline -ct) 2>/dev/null)
    switch "$reply[1]"
        case files
            __fish_complete_path (commandline -ct)
        case dirs
            __fish_complete_directories (commandline -ct)
        case '*'
            printf '%s\n' $reply[2..-1]
    end
end
complete -c kdlabctl -f -a '(__kdlabctl_complete)'
""",
}


async def cmd_completion(_client: object, args: argparse.Namespace) -> int:
    sys.stdout.write(SCRIPTS[args.shell])
    return 0


def define(parser: argparse.ArgumentParser) -> None:
    """The argument of ``kdlabctl completion SHELL`` (*parser*, its parser)."""
    parser.add_argument("shell", metavar="SHELL", choices=sorted(SCRIPTS))
    parser.set_defaults(func=cmd_completion, needs_daemon=False)
