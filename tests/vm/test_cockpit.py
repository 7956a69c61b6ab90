"""kdlab's Cockpit page in Debian's headless chromium, on real libvirt (issue 14).

As a user does it: alice, a real login user, runs ``kdlabctl web`` (from her
copy of this checkout, on this module's kdlabd and its private bus) and
alice's own browser (chromium and chromedriver run as alice, driven by
selenium) opens the URL it printed (tests/support/browser.py). The page is
this checkout's (kdlabctl/cockpit, installed with xterm.js by
.ci/cockpit-page into the bridge's XDG_DATA_HOME), not the copy .ci/install
put in /usr/share/cockpit. alice's bridge talks to kdlabd as alice and runs
alice's kdlabctl. What a user sees is checked in the browser's DOM: VMs
created and started from the command line appear and change state without
a reload; the page's buttons start, stop and delete (after a confirmation);
its form creates a VM from paths on the host; the console pane shows the
kernel's boot and takes typing; errors are the messages kdlabd and kdlabctl
give; bob's browser at alice's URL gets nothing. Screenshots are left in the
artifacts directory (tests/support/browser.py: artifacts_dir).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from kdlab.wire import vm_path
from kdlabctl.web import FORBIDDEN, PAGE, TOKEN
from kdlabd.core.journal import HOLD_ENV
from tests.support import browser
from tests.support.browser import Browser, PageServer
from tests.support.bus import BusClient, BusMonitor
from tests.support.clients import TRACEBACK_MARKERS
from tests.support.daemon import Kdlabd
from tests.support.logins import (
    LOGIN_ENV,
    Logins,
    LoginUser,
    kdlabctl_command,
    kill,
    login_argv,
)
from tests.support.system import remove_vm, system_kdlabd
from tests.vm.conftest import MARKER, Lab

pytestmark = pytest.mark.vm

POOL_PREFIX = f"kdlab-vmweb{os.getpid()}"
BOOT_SECONDS = 240.0  # a Debian kernel to userspace under TCG on a busy machine


@dataclass(frozen=True)
class Served:
    """The page served by ``kdlabctl web`` as alice on this module's kdlabd."""

    lab: Lab  # the Debian kernel and initramfs
    daemon: Kdlabd
    logins: Logins
    page: PageServer
    artifacts: Path  # where screenshots go

    def ctl(self, user: LoginUser, *args: str) -> subprocess.CompletedProcess[str]:
        """kdlabctl run by *user* from a login shell, on this module's kdlabd."""
        return self.logins.kdlabctl(user, self.daemon.address, *args)

    def ctl_ok(self, user: LoginUser, *args: str) -> None:
        done = self.ctl(user, *args)
        assert done.returncode == 0, done.stderr

    def create_args(self, name: str) -> tuple[str, ...]:
        return ("create", name, "--kernel", str(self.lab.kernel.vmlinuz),
                "--initrd", str(self.lab.initramfs), "--memory", "256")  # fmt: skip


@dataclass(frozen=True)
class Site(Served):
    """The served page and alice's browser on it."""

    web: Browser

    def open(self) -> Browser:
        """The URL kdlabctl web printed, loaded afresh in alice's browser."""
        self.web.open(self.page.url)
        return self.web


@pytest.fixture(scope="module")
def served(
    lab: Lab, logins: Logins, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """This module's kdlabd on the system libvirtd, as the lab's except that an
    upload into its image pool waits there until its job is cancelled (an
    import stays a running job for the page to cancel); ``kdlabctl web`` run
    by alice on it, stopped at the end."""
    browser.require_browser()
    artifacts = browser.artifacts_dir(tmp_path_factory.getbasetemp())
    root = Path(tempfile.mkdtemp(prefix="kdlab-cockpit-", dir="/var/tmp"))
    root.chmod(0o755)  # alice's bridge reads the page and runs the wrapper there
    hold = {HOLD_ENV: "image.upload-started"}
    try:
        with system_kdlabd(POOL_PREFIX, env=hold) as daemon:
            log = artifacts / "kdlabctl-web.log"
            page = PageServer(logins.alice, daemon.address, root, log)
            try:
                yield Served(lab, daemon, logins, page, artifacts)
            finally:
                page.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def site(served: Served) -> Iterator[Site]:
    """The page and alice's headless chromium, quit after the test (one
    browser at a time: another user's test starts its own)."""
    with browser.browser(served.artifacts, served.logins.alice) as web:
        yield Site(**vars(served), web=web)


@pytest.fixture
def vm_name(served: Served) -> Iterator[str]:
    """A fresh VM name; whatever the test leaves of it is removed afterwards."""
    name = f"web-{uuid.uuid4().hex[:8]}"
    yield name
    remove_vm(served.daemon, name)


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


def as_page_shows(stderr: str) -> str:
    """kdlabctl's error output as the page shows it: its sentences, unprefixed."""
    lines = stderr.strip().splitlines()
    return "\n".join(line.removeprefix("kdlabctl: ") for line in lines)


def test_page_lists_a_vm_created_with_kdlabctl_and_follows_its_state(
    site: Site, vm_name: str
) -> None:
    """A VM created and started from a terminal shows up and changes state on
    the open page: no reload (the document is the one loaded), no poll."""
    web, logins = site.web, site.logins
    site.open()
    web.mark()
    assert not web.exists(row(vm_name))

    site.ctl_ok(logins.alice, *site.create_args(vm_name))
    wait_state(web, vm_name, "defined")
    web.wait_for_text(
        cell(vm_name, "owner"), lambda text: text == logins.alice.name,
        "the owner is not shown by name",
    )  # fmt: skip
    assert web.find(button(vm_name, "start")).is_enabled()
    assert not web.find(button(vm_name, "stop")).is_enabled()

    site.ctl_ok(logins.alice, "start", "--paused", vm_name)
    wait_state(web, vm_name, "paused")
    web.wait_for_text(
        cell(vm_name, "debugger"), lambda text: "waiting" in text,
        "WaitingForDebugger is not shown",
    )  # fmt: skip
    assert web.find(button(vm_name, "force-stop")).is_enabled()
    web.screenshot("vm-paused-from-the-command-line")

    site.ctl_ok(logins.alice, "stop", "--force", vm_name)
    wait_state(web, vm_name, "stopped")
    assert web.same_document(), "the page reloaded"


def test_the_address_can_name_a_vm_as_notifications_do(
    site: Site, vm_name: str
) -> None:
    """kdlabctl notify's "Show page" opens the page at ``#/vm/NAME``: that
    VM's row is marked, and only it."""
    logins = site.logins
    site.ctl_ok(logins.alice, *site.create_args(vm_name))
    web = site.web
    web.open(f"{site.page.url}#/vm/{vm_name}")
    web.wait_until(
        lambda: "chosen" in web.find(row(vm_name)).get_attribute("class"),
        "the VM the address names is not marked",
    )
    assert len(web.driver.find_elements("css selector", "#vm-list tr.chosen")) == 1
    web.screenshot("vm-named-in-the-address")


def test_readme_alice_runs_kdlabctl_web_and_follows_her_vm_from_a_terminal(
    site: Site, vm_name: str
) -> None:
    """README's scenario: alice has a VM; she runs ``kdlabctl web`` and opens
    the URL of its first line in her browser, which shows her VM; she starts
    and stops it with kdlabctl in a terminal, and the state cell follows
    each time, in the document first loaded (no reload)."""
    web, alice = site.web, site.logins.alice
    site.ctl_ok(alice, *site.create_args(vm_name))
    printed = urlsplit(site.page.url)
    assert printed.netloc == f"127.0.0.1:{site.page.port}"
    assert printed.path == PAGE
    assert parse_qs(printed.query)[TOKEN]
    site.open()
    web.mark()
    # The token was traded for the cookie: it left the address bar.
    assert web.driver.current_url == printed._replace(query="").geturl()
    wait_state(web, vm_name, "defined")
    web.wait_for_text(
        cell(vm_name, "owner"), lambda text: text == alice.name, "not alice's"
    )

    site.ctl_ok(alice, "start", vm_name)
    wait_state(web, vm_name, "running")
    web.screenshot("started-from-a-terminal")
    site.ctl_ok(alice, "stop", "--timeout", "5", vm_name)
    wait_state(web, vm_name, "stopped")
    assert web.same_document(), "the page reloaded"
    assert web.text("#error") == ""


def test_another_users_browser_at_the_url_gets_nothing(
    served: Served, vm_name: str
) -> None:
    """bob's own browser (his chromium, his chromedriver) opens the URL
    alice's kdlabctl web printed, token and all: the page is refused (403,
    the front's sentence), no cookie is set, Cockpit's shell and socket are
    refused too, and nothing of alice's (her VM) reaches him."""
    served.ctl_ok(served.logins.alice, *served.create_args(vm_name))
    refusal = FORBIDDEN.partition(b"\r\n\r\n")[2].decode().strip()
    with browser.browser(served.artifacts, served.logins.bob) as web:
        for url in (served.page.url, served.page.shell_url):
            web.driver.get(url)
            status = web.driver.execute_script(
                "return performance.getEntriesByType('navigation')[0].responseStatus;"
            )
            assert status == 403, url
            assert web.text("body").strip() == refusal
            assert vm_name not in web.driver.page_source
            assert not web.exists("#vm-list")
        assert web.driver.get_cookies() == []
        opened = web.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            " const socket = new WebSocket("
            "   `ws://${location.host}/cockpit/socket`, 'cockpit1');"
            " socket.onopen = () => done('opened');"
            " socket.onclose = () => done('refused');"
        )
        assert opened == "refused"
        web.screenshot("another-users-browser-refused")


def test_page_creates_starts_and_shows_the_console(site: Site, vm_name: str) -> None:
    """The form creates a VM from paths on the host (kdlabctl opens them as
    alice); Start boots it; the console pane shows the kernel's boot to the
    initramfs' shell and types into it; the boot log pane has the whole boot."""
    web, logins = site.web, site.logins
    site.open()
    form = "#create-form"
    for field, value in (
        ("name", vm_name),
        ("kernel", str(site.lab.kernel.vmlinuz)),
        ("initrd", str(site.lab.initramfs)),
        ("memory", "256"),
    ):
        web.find(f'{form} [name="{field}"]').send_keys(value)
    web.click(f'{form} button[data-action="create"]')
    wait_state(web, vm_name, "defined", timeout=120)
    assert web.text("#error") == ""
    shown = site.ctl(logins.alice, "show", "--json", vm_name)
    assert shown.returncode == 0, shown.stderr
    assert f'"owner": {logins.alice.uid}' in shown.stdout

    # The page's calls reach the lab's kdlabd, on its private bus, as alice.
    with BusMonitor(site.daemon.address) as monitor:
        web.click(button(vm_name, "start"))
        wait_state(web, vm_name, "running", timeout=120)
        assert monitor.calls("Start", path=vm_path(vm_name))
    web.click(button(vm_name, "console"))
    rows = "#console .xterm-rows"
    web.wait_for_text(
        rows, lambda text: MARKER in text and site.lab.kernel.release in text,
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


def test_delete_asks_first_then_removes_the_vm(site: Site, vm_name: str) -> None:
    web, logins = site.web, site.logins
    site.ctl_ok(logins.alice, *site.create_args(vm_name))
    site.open()
    wait_state(web, vm_name, "defined")

    web.click(button(vm_name, "delete"))
    web.wait_until(lambda: web.find("#confirm").is_displayed(), "no confirmation")
    assert vm_name in web.text("#confirm-text")
    web.click('#confirm button[data-action="cancel"]')
    web.wait_until(lambda: not web.find("#confirm").is_displayed(), "dialog stays")
    assert web.exists(row(vm_name))
    site.ctl_ok(logins.alice, "show", vm_name)

    web.click(button(vm_name, "delete"))
    web.click('#confirm button[data-action="confirm"]')
    web.wait_until(lambda: not web.exists(row(vm_name)), "the deleted VM stays listed")
    listed = site.ctl(logins.alice, "list")
    assert vm_name not in listed.stdout
    assert web.text("#error") == ""


def test_errors_are_shown_as_their_messages(site: Site, vm_name: str) -> None:
    """Starting bob's VM (alice may not) shows kdlabd's NotAuthorized message;
    a create from a kernel path that does not exist shows kdlabctl's sentence;
    each is what the command line says, and no stack."""
    web, logins = site.web, site.logins
    site.ctl_ok(logins.bob, *site.create_args(vm_name))
    site.open()
    wait_state(web, vm_name, "defined")
    web.wait_for_text(
        cell(vm_name, "owner"), lambda text: text == logins.bob.name, "bob not shown"
    )
    refused = site.ctl(logins.alice, "start", vm_name)
    assert refused.returncode != 0
    web.click(button(vm_name, "start"))
    shown = web.wait_for_text("#error", bool, "no error shown")
    assert shown == as_page_shows(refused.stderr)
    assert web.find("#error").is_displayed()
    wait_state(web, vm_name, "defined")

    missing = "/nonexistent/bzImage"
    bad = site.ctl(logins.alice, "create", f"{vm_name}-x", "--kernel", missing)
    assert bad.returncode != 0
    site.open()
    web.find('#create-form [name="name"]').send_keys(f"{vm_name}-x")
    web.find('#create-form [name="kernel"]').send_keys(missing)
    web.click('#create-form button[data-action="create"]')
    shown = web.wait_for_text("#error", bool, "no error shown for the bad path")
    assert shown == as_page_shows(bad.stderr)
    assert missing in shown
    web.screenshot("error")
    for marker in TRACEBACK_MARKERS:
        assert marker not in web.text("body")


def test_a_failed_boot_shows_its_diagnosis(site: Site, vm_name: str) -> None:
    """A kernel without a root file system (and without kdlab's initramfs)
    panics; the page shows the VM's Diagnosis property (severity, cause and
    fix) as kdlabd announces it."""
    web, logins = site.web, site.logins
    kernel_only = (
        *("--kernel", str(site.lab.kernel.vmlinuz)),
        *("--no-initramfs", "--memory", "256"),
    )
    site.ctl_ok(logins.alice, "create", vm_name, *kernel_only)
    site.open()
    wait_state(web, vm_name, "defined")
    diagnosis = cell(vm_name, "diagnosis")
    assert web.text(diagnosis) == ""
    web.click(button(vm_name, "start"))
    client = BusClient(site.daemon.address)
    try:

        def as_announced() -> bool:
            _, severity, cause, fix = client.vm_properties(vm_name)["Diagnosis"]
            shown = web.text(diagnosis)
            return bool(cause) and shown == f"{severity}: {cause}Fix: {fix}"

        web.wait_until(as_announced, "the diagnosis is not shown", BOOT_SECONDS)
        _, severity, _, _ = client.vm_properties(vm_name)["Diagnosis"]
    finally:
        client.close()
    assert severity == "error"
    assert web.find(diagnosis).get_attribute("class") == "severity-error"
    web.screenshot("diagnosis", top=True)
    web.click(button(vm_name, "force-stop"))
    wait_state(web, vm_name, "stopped")


def test_page_follows_kdlabd_through_a_restart(site: Site, vm_name: str) -> None:
    """kdlabd stopped and started again (as systemctl restart does): the open
    page says it lost kdlabd, then lists the VM again and follows its state,
    without a reload."""
    web, logins = site.web, site.logins
    site.ctl_ok(logins.alice, *site.create_args(vm_name))
    site.open()
    web.mark()
    wait_state(web, vm_name, "defined")
    site.daemon.stop()
    try:
        web.wait_until(
            lambda: "kdlabd" in web.text("#status"), "the page did not notice"
        )
    finally:
        site.daemon.start(env={HOLD_ENV: "image.upload-started"})
    web.wait_until(lambda: web.text("#status") == "", "the page did not reconnect")
    wait_state(web, vm_name, "defined")
    site.ctl_ok(logins.alice, "start", "--paused", vm_name)
    wait_state(web, vm_name, "paused")
    site.ctl_ok(logins.alice, "stop", "--force", vm_name)
    wait_state(web, vm_name, "stopped")
    assert web.same_document(), "the page reloaded"


def test_cockpit_menu_lists_kernel_lab(site: Site) -> None:
    """Cockpit's own shell, behind the same kdlabctl web (the cookie the
    printed URL gave lets the browser in), finds the page: "Kernel lab" in
    its menu opens the page, which lists the VMs."""
    web = site.open()
    web.driver.get(site.page.shell_url)
    entry = 'a[href="/kdlab"]'
    web.wait_until(
        lambda: "Kernel lab" in web.find(entry).text, "no Kernel lab in the menu"
    )
    web.find(entry).click()
    frame = 'iframe[name="cockpit1:localhost/kdlab"]'
    web.wait_until(lambda: web.find(frame).is_displayed(), "the page did not open")
    web.driver.switch_to.frame(web.find(frame))
    try:
        web.wait_until(lambda: web.text("#status") == "", "the page never loaded")
        assert web.exists("#vm-list")
    finally:
        web.driver.switch_to.default_content()
    web.screenshot("cockpit-menu")  # the shell with the page loaded in its frame


def job_row(web: Browser, target: str) -> str:
    """The selector of the row of the job on *target* (once there is one)."""
    job = web.wait_until(
        lambda: web.driver.execute_script(
            "const row = [...document.querySelectorAll('#job-list tr[data-job]')]"
            ".find(r => r.querySelector('[data-field=target]').textContent"
            " === arguments[0]);"
            " return row ? row.dataset.job : null;",
            target,
        ),
        f"no job on {target} is listed",
    )
    return f'#job-list tr[data-job="{job}"]'


def test_images_listed_and_a_running_import_cancelled(site: Site) -> None:
    """An image made from the command line appears with its owner and goes
    when deleted; an import from the command line is a running job on the
    page, whose Cancel ends it (the importing kdlabctl says so) and leaves no
    image."""
    web, logins, daemon = site.web, site.logins, site.daemon
    blank, imported = f"web-blank-{site.page.port}", f"web-import-{site.page.port}"
    site.open()
    site.ctl_ok(logins.alice, "image", "create", blank, "--size", "16M")
    image = f'#image-list tr[data-image="{blank}"]'
    web.wait_for_text(image, lambda text: logins.alice.name in text, "no owner")

    disk = Path(tempfile.mkdtemp(dir="/var/tmp")) / "disk.raw"
    disk.write_bytes(b"\0" * (1 << 20))
    disk.parent.chmod(0o755)
    disk.chmod(0o644)
    command = kdlabctl_command(daemon.address, "image", "import", imported, str(disk))
    importer = subprocess.Popen(
        login_argv(logins.alice, command),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=LOGIN_ENV,
        cwd="/",
        text=True,
    )
    try:
        job = job_row(web, imported)
        web.wait_for_text(
            f'{job} [data-field="state"]', lambda text: text == "running", "not running"
        )
        web.wait_until(
            lambda: web.exists(f"{job} progress"), "the job shows no progress bar"
        )
        web.screenshot("job-running", show="#image-list")
        web.click(f'{job} button[data-action="cancel"]')
        web.wait_for_text(
            f'{job} [data-field="state"]',
            lambda text: text == "cancelled",
            "the job was not cancelled",
        )
        assert not web.find(f'{job} button[data-action="cancel"]').is_enabled()
        _, stderr = importer.communicate(timeout=60)
        assert importer.returncode != 0
        assert "cancel" in stderr.lower(), stderr
    finally:
        if importer.poll() is None:
            kill(importer)
        shutil.rmtree(disk.parent)
    assert not web.exists(f'#image-list tr[data-image="{imported}"]')
    assert web.text("#error") == ""

    site.ctl_ok(logins.alice, "image", "delete", blank)
    web.wait_until(lambda: not web.exists(image), "the deleted image stays listed")
