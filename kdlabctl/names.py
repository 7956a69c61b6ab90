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


VM_NAME = Names("vms")
IMAGE_NAME = Names("images")
RECORDING_ID = Names("recordings")
