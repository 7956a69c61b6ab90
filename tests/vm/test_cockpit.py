"""kdlab's Cockpit page in Debian's headless chromium, on real libvirt (issue 14).

The page (kdlabctl/cockpit, installed with xterm.js by .ci/cockpit-page) is
served by Cockpit's own cockpit-ws and cockpit-bridge as the member alice, a
real login user (tests/support/browser.py), whose bridge talks to this tier's
kdlabd on its private bus and runs alice's kdlabctl. What a user sees is
checked in the browser's DOM: VMs created and started from the command line
appear and change state without a reload; the page's buttons start, stop and
delete (after a confirmation); its form creates a VM from paths on the host;
the console pane shows the kernel's boot and takes typing; errors are the
messages kdlabd and kdlabctl give. Screenshots are left in the artifacts
directory (tests/support/browser.py: artifacts_dir).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kdlab.wire import vm_path
from tests.support import browser
from tests.support.browser import Browser, PageServer
from tests.support.bus import BusMonitor
from tests.support.clients import TRACEBACK_MARKERS
from tests.support.logins import Logins, LoginUser
from tests.vm.conftest import MARKER, Lab

pytestmark = pytest.mark.vm

BOOT_SECONDS = 240.0  # a Debian kernel to userspace under TCG on a busy machine


@pytest.fixture(scope="module")
def page(lab: Lab, logins: Logins) -> Iterator[PageServer]:
    """The page served as alice, on the lab's kdlabd."""
    browser.require_browser()
    root = Path(tempfile.mkdtemp(prefix="kdlab-cockpit-", dir="/var/tmp"))
    root.chmod(0o755)  # alice's bridge reads the page and runs the wrapper there
    try:
        server = PageServer(logins.alice, lab.daemon.address, root)
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    """One headless chromium for the module, quit at its end."""
    with browser.browser(
        browser.artifacts_dir(tmp_path_factory.getbasetemp())
    ) as session:
        yield session


def row(name: str) -> str:
    return f'#vm-list tr[data-vm="{name}"]'


def cell(name: str, field: str) -> str:
    return f'{row(name)} [data-field="{field}"]'


def button(name: str, action: str) -> str:
    return f'{row(name)} button[data-action="{action}"]'


def wait_state(web: Browser, name: str, state: str, timeout: float = 60.0) -> None:
    web.wait_for_text(
        cell(name, "state"),
        lambda text: text == state,
        f"{name} never {state}",
        timeout,
    )


def ctl_ok(logins: Logins, user: LoginUser, lab: Lab, *args: str) -> None:
    done = logins.kdlabctl(user, lab.daemon.address, *args)
    assert done.returncode == 0, done.stderr


def create_args(lab: Lab, name: str) -> tuple[str, ...]:
    return ("create", name, "--kernel", str(lab.kernel.vmlinuz),
            "--initrd", str(lab.initramfs), "--memory", "256")  # fmt: skip


def as_page_shows(stderr: str) -> str:
    """kdlabctl's error output as the page shows it: its sentences, unprefixed."""
    lines = stderr.strip().splitlines()
    return "\n".join(line.removeprefix("kdlabctl: ") for line in lines)


def test_page_lists_a_vm_created_with_kdlabctl_and_follows_its_state(
    lab: Lab, logins: Logins, page: PageServer, web: Browser, vm_name: str
) -> None:
    """A VM created and started from a terminal shows up and changes state on
    the open page: no reload (the document is the one loaded), no poll."""
    web.open(page.url)
    web.mark()
    assert not web.exists(row(vm_name))

    ctl_ok(logins, logins.alice, lab, *create_args(lab, vm_name))
    wait_state(web, vm_name, "defined")
    web.wait_for_text(
        cell(vm_name, "owner"), lambda text: text == logins.alice.name,
        "the owner is not shown by name",
    )  # fmt: skip
    assert web.find(button(vm_name, "start")).is_enabled()
    assert not web.find(button(vm_name, "stop")).is_enabled()

    ctl_ok(logins, logins.alice, lab, "start", "--paused", vm_name)
    wait_state(web, vm_name, "paused")
    web.wait_for_text(
        cell(vm_name, "debugger"), lambda text: "waiting" in text,
        "WaitingForDebugger is not shown",
    )  # fmt: skip
    assert web.find(button(vm_name, "force-stop")).is_enabled()
    web.screenshot("vm-paused-from-the-command-line")

    ctl_ok(logins, logins.alice, lab, "stop", "--force", vm_name)
    wait_state(web, vm_name, "stopped")
    assert web.same_document(), "the page reloaded"


def test_page_creates_starts_and_shows_the_console(
    lab: Lab, logins: Logins, page: PageServer, web: Browser, vm_name: str
) -> None:
    """The form creates a VM from paths on the host (kdlabctl opens them as
    alice); Start boots it; the console pane shows the kernel's boot to the
    initramfs' shell and types into it; the boot log pane has the whole boot."""
    web.open(page.url)
    form = "#create-form"
    for field, value in (
        ("name", vm_name),
        ("kernel", str(lab.kernel.vmlinuz)),
        ("initrd", str(lab.initramfs)),
        ("memory", "256"),
    ):
        web.find(f'{form} [name="{field}"]').send_keys(value)
    web.click(f'{form} button[data-action="create"]')
    wait_state(web, vm_name, "defined", timeout=120)
    assert web.text("#error") == ""
    shown = logins.kdlabctl(logins.alice, lab.daemon.address, "show", "--json", vm_name)
    assert shown.returncode == 0, shown.stderr
    assert f'"owner": {logins.alice.uid}' in shown.stdout

    # The page's calls reach the lab's kdlabd, on its private bus, as alice.
    with BusMonitor(lab.daemon.address) as monitor:
        web.click(button(vm_name, "start"))
        wait_state(web, vm_name, "running", timeout=120)
        assert monitor.calls("Start", path=vm_path(vm_name))
    web.click(button(vm_name, "console"))
    rows = "#console .xterm-rows"
    web.wait_for_text(
        rows, lambda text: MARKER in text and lab.kernel.release in text,
        "the console never showed the boot reaching userspace", BOOT_SECONDS,
    )  # fmt: skip
    web.find("#console .xterm-helper-textarea").send_keys("echo kdlab-$((6*7))\n")
    web.wait_for_text(rows, lambda text: "kdlab-42" in text, "typing got no answer")
    web.wait_for_text(
        "#log", lambda text: "Linux version" in text and MARKER in text,
        "the boot log pane lacks the kernel's boot",
    )  # fmt: skip
    web.screenshot("console", top=True)  # docs/cockpit.png

    web.click(button(vm_name, "force-stop"))
    wait_state(web, vm_name, "stopped")
    assert web.text("#error") == ""


def test_delete_asks_first_then_removes_the_vm(
    lab: Lab, logins: Logins, page: PageServer, web: Browser, vm_name: str
) -> None:
    ctl_ok(logins, logins.alice, lab, *create_args(lab, vm_name))
    web.open(page.url)
    wait_state(web, vm_name, "defined")

    web.click(button(vm_name, "delete"))
    web.wait_until(lambda: web.find("#confirm").is_displayed(), "no confirmation")
    assert vm_name in web.text("#confirm-text")
    web.click('#confirm button[data-action="cancel"]')
    web.wait_until(lambda: not web.find("#confirm").is_displayed(), "dialog stays")
    assert web.exists(row(vm_name))
    ctl_ok(logins, logins.alice, lab, "show", vm_name)

    web.click(button(vm_name, "delete"))
    web.click('#confirm button[data-action="confirm"]')
    web.wait_until(lambda: not web.exists(row(vm_name)), "the deleted VM stays listed")
    listed = logins.kdlabctl(logins.alice, lab.daemon.address, "list")
    assert vm_name not in listed.stdout
    assert web.text("#error") == ""


def test_errors_are_shown_as_their_messages(
    lab: Lab, logins: Logins, page: PageServer, web: Browser, vm_name: str
) -> None:
    """Starting bob's VM (alice may not) shows kdlabd's NotAuthorized message;
    a create from a kernel path that does not exist shows kdlabctl's sentence;
    each is what the command line says, and no stack."""
    ctl_ok(logins, logins.bob, lab, *create_args(lab, vm_name))
    web.open(page.url)
    wait_state(web, vm_name, "defined")
    web.wait_for_text(
        cell(vm_name, "owner"), lambda text: text == logins.bob.name, "bob not shown"
    )
    refused = logins.kdlabctl(logins.alice, lab.daemon.address, "start", vm_name)
    assert refused.returncode != 0
    web.click(button(vm_name, "start"))
    shown = web.wait_for_text("#error", bool, "no error shown")
    assert shown == as_page_shows(refused.stderr)
    assert web.find("#error").is_displayed()
    wait_state(web, vm_name, "defined")

    missing = "/nonexistent/bzImage"
    bad = logins.kdlabctl(
        logins.alice, lab.daemon.address, "create", f"{vm_name}-x", "--kernel", missing
    )
    assert bad.returncode != 0
    web.open(page.url)
    web.find('#create-form [name="name"]').send_keys(f"{vm_name}-x")
    web.find('#create-form [name="kernel"]').send_keys(missing)
    web.click('#create-form button[data-action="create"]')
    shown = web.wait_for_text("#error", bool, "no error shown for the bad path")
    assert shown == as_page_shows(bad.stderr)
    assert missing in shown
    web.screenshot("error")
    for marker in TRACEBACK_MARKERS:
        assert marker not in web.text("body")


def test_images_and_jobs_are_listed_live(
    lab: Lab, logins: Logins, page: PageServer, web: Browser
) -> None:
    """An image imported from the command line appears with its owner, its
    import job with its end and full progress; deleting it removes its row."""
    name = f"cockpit-{page.port}"
    web.open(page.url)
    disk = Path(tempfile.mkdtemp(dir="/var/tmp")) / "disk.raw"
    try:
        disk.write_bytes(b"\0" * (1 << 20))
        disk.parent.chmod(0o755)
        disk.chmod(0o644)
        ctl_ok(logins, logins.alice, lab, "image", "import", name, str(disk))
    finally:
        shutil.rmtree(disk.parent)
    image = f'#image-list tr[data-image="{name}"]'
    web.wait_until(lambda: web.exists(image), "the imported image is not listed")
    web.wait_for_text(image, lambda text: logins.alice.name in text, "no owner")
    job = "#job-list tr"
    web.wait_until(
        lambda: any(
            name in item.text and "succeeded" in item.text
            for item in web.driver.find_elements("css selector", job)
        ),
        "the import's job is not listed as succeeded",
    )
    assert web.driver.execute_script(
        "return [...document.querySelectorAll('#job-list tr')]"
        ".some(r => r.textContent.includes(arguments[0])"
        " && r.querySelector('progress').value === 1"
        " && r.querySelector('button[data-action=cancel]').disabled);",
        name,
    )
    ctl_ok(logins, logins.alice, lab, "image", "delete", name)
    web.wait_until(lambda: not web.exists(image), "the deleted image stays listed")
