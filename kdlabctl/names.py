"""The names an argument takes, for the shell's completion (stdlib only).

kdlabctl's parser is built at every start; its arguments say what they take
(:data:`VM_NAME`, :data:`IMAGE_NAME`, :data:`RECORDING_ID`), and
:mod:`kdlabctl.completion`, loaded only on a Tab, asks kdlabd for those names.
Nothing here may cost start-up.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing's import costs start-up; mypy takes this as True
if TYPE_CHECKING:
    from kdlabctl.client import Listing

HIDDEN = "__complete"  # the command the completion scripts run: kdlabctl.completion
# The command ssh runs on a host for ``--host`` (kdlabctl.bridge.serve).
BRIDGE = "__bridge"


class Names:
    """An argparse type: the name of a VM, an image or a recording that exists.

    It keeps the text as it is (kdlabd judges names); completion asks kdlabd
    for the names of *listing*.
    """

    __slots__ = ("listing",)

    def __init__(self, listing: Listing) -> None:
        self.listing: Listing = listing

    def __call__(self, text: str) -> str:
        return text


class HostSpec:
    """An argparse type: ``--host``'s value, a host of hosts.toml or an ssh
    destination (kdlabctl.hosts judges it when the command runs; completion
    offers hosts.toml's names)."""

    __slots__ = ()

    def __call__(self, text: str) -> str:
        return text


HOST = HostSpec()
VM_NAME = Names("vms")
IMAGE_NAME = Names("images")
RECORDING_ID = Names("recordings")
