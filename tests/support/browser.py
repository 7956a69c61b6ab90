"""kdlab's Cockpit page in a real browser, for the vm tier: as a user gets it.

A user runs ``kdlabctl web`` and opens the URL it prints; so do the tests,
and this module is the one place that says how the page is served and how
the browser starts:

- :func:`install_page` installs this checkout's page (``kdlabctl/cockpit``
  with xterm.js from ``npm ci``) with ``.ci/cockpit-page``, as ``.ci/install``
  does, into a directory of the test's.
- :class:`PageServer` is ``kdlabctl web`` run by a real login user (from the
  user's copy of this checkout, tests.support.web.WebServer) on the test's
  private bus: its cockpit-bridge runs as that user, calls kdlabd as that
  user and spawns that user's ``kdlabctl``. The page it serves is this
  checkout's (``XDG_DATA_HOME``), not the one in ``/usr/share/cockpit``.
- :class:`Browser` is Debian's headless ``chromium`` run by a login user
  (kdlabctl web admits only its own user's sockets), through a
  ``chromedriver`` of that user's that selenium drives as a Remote WebDriver;
  one at a time (it is heavy), closed by its context manager, which also
  checks that no chromium or chromedriver of the user is left. Screenshots
  go to :func:`artifacts_dir`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tests.support import REPO, logins
from tests.support.logins import LoginUser
from tests.support.prereq import require, require_tool
from tests.support.relay import Relay
from tests.support.timeouts import STARTUP_TIMEOUT
from tests.support.web import WebServer, processes_of

COCKPIT_WS = "/usr/lib/cockpit/cockpit-ws"
SHELL_MANIFEST = "/usr/share/cockpit/shell/manifest.json"  # Cockpit's menu
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# What a browser runs as its user (process names, cut to 15 characters as
# the kernel does): chromium's crash handlers leave its process tree (their
# parent is init), so only their name finds them.
BROWSER_PROGRAMS = ("chromium", "chromedriver", "chrome_crashpad")
PAGE_SOURCES = REPO / "kdlabctl" / "cockpit"
INSTALL_PAGE = REPO / ".ci" / "cockpit-page"
WINDOW = (1280, 1000)
WAIT_SECONDS = 30.0
NPM_TIMEOUT = 300.0


def require_browser() -> None:
    """Skip (or in CI fail) without Cockpit, chromium and npm (.ci/setup)."""
    require(
        Path(SHELL_MANIFEST).exists(),
        "Cockpit's shell (apt-get install cockpit-system)",
    )
    for path, package in (
        (COCKPIT_WS, "cockpit-ws"),
        ("cockpit-bridge", "cockpit-bridge"),
        (CHROMIUM, "chromium"),
        (CHROMEDRIVER, "chromium-driver"),
        ("npm", "npm"),
    ):
        require_tool(path, package)


def artifacts_dir(basetemp: Path) -> Path:
    """Where the browser tests leave screenshots: ``$KDLAB_ARTIFACTS/cockpit``,
    else ``cockpit-screenshots`` under pytest's *basetemp*."""
    root = os.environ.get("KDLAB_ARTIFACTS")
    path = Path(root) / "cockpit" if root else basetemp / "cockpit-screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


def install_page(data_home: Path) -> Path:
    """Install this checkout's page as ``DATA_HOME/cockpit/kdlab``, where the
    bridge of a user whose ``XDG_DATA_HOME`` is *data_home* finds it first."""
    dest = data_home / "cockpit" / "kdlab"
    dest.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [str(INSTALL_PAGE), str(PAGE_SOURCES), str(dest)],
        capture_output=True,
        text=True,
        timeout=NPM_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, f".ci/cockpit-page failed:\n{result.stderr}"
    return dest


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def kdlabctl_wrapper(directory: Path) -> Path:
    """A ``kdlabctl`` for *directory* (put first on PATH) that runs the
    calling user's copy of this checkout, as tests.support.logins does."""
    directory.mkdir(parents=True, exist_ok=True)
    wrapper = directory / "kdlabctl"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'PYTHONPATH="$HOME/{logins.CLONE}" exec {logins.PYTHON} -m kdlabctl "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


class PageServer:
    """The page served as a user does: ``kdlabctl web`` run by *user* (from
    the user's copy of this checkout) on the bus *bus*; :attr:`url` is the
    first line it printed, token included.

    The page is this checkout's (:func:`install_page` into ``XDG_DATA_HOME``,
    which the bridge reads before ``/usr/share/cockpit``, where ``.ci/install``
    put main's); the ``kdlabctl`` the page spawns is the user's copy too
    (:func:`kdlabctl_wrapper`, first on PATH). Both reach the bridge through
    kdlabctl web's environment. *root* must be a directory every user may
    enter (the page and the wrapper go there). What kdlabctl web, cockpit-ws
    and the bridge write goes to the file *log* (an artifact). *args* are
    kdlabctl web's (``--host lab``), *within* as :class:`WebServer`'s.
    """

    def __init__(
        self,
        user: LoginUser,
        bus: str,
        root: Path,
        log: Path,
        *args: str,
        within: Sequence[str] = (),
    ) -> None:
        self.user = user
        data_home = root / "share"
        install_page(data_home)
        bindir = kdlabctl_wrapper(root / "bin").parent
        environment = {
            "XDG_DATA_HOME": str(data_home),
            "PATH": f"{bindir}:{logins.LOGIN_ENV['PATH']}",
        }
        exports = " ".join(
            f"{key}={shlex.quote(value)}" for key, value in environment.items()
        )
        self.server = WebServer(user, bus, *args, env=exports, log=log, within=within)
        if not self.server.url.startswith("http://127.0.0.1:"):
            self.stop()
            raise AssertionError(
                f"kdlabctl web printed no URL ({self.server.url!r}):\n{self.output()}"
            )
        self.port = self.server.port

    @property
    def url(self) -> str:
        """The URL kdlabctl web printed: the page, with the token."""
        return self.server.url

    @property
    def shell_url(self) -> str:
        """The address of Cockpit's shell, whose menu lists the page (the
        browser needs the cookie :attr:`url` gives first)."""
        return f"http://127.0.0.1:{self.port}/"

    def output(self) -> str:
        """What kdlabctl web, cockpit-ws and the bridge wrote so far."""
        return self.server.output()

    def stop(self) -> None:
        self.server.close()


class Browser:
    """Headless chromium run by *user*, driven by selenium through a
    chromedriver of *user*'s (Remote WebDriver on a loopback port).

    The browser must be the user's: kdlabctl web lets in only sockets of
    the uid that runs it. The profile (``--user-data-dir``) is a directory
    in the user's home, removed by :meth:`close`. Chromium keeps its sandbox
    (unprivileged user namespaces suffice for a user that is not root).

    With *within* (tests/support/sshhost.py's ``SshHost.within``), chromedriver
    and chromium run inside that network namespace, where a ``kdlabctl web``
    run there listens; selenium reaches chromedriver's port through a
    :class:`tests.support.relay.Relay`. The browser's own connections stay
    in the namespace: kdlabctl web sees the user's sockets, not a relay's.
    """

    def __init__(
        self, artifacts: Path, user: LoginUser, within: Sequence[str] = ()
    ) -> None:
        from selenium import webdriver
        from selenium.webdriver.remote.file_detector import UselessFileDetector

        self.artifacts = artifacts
        self.user = user
        port = free_port()
        self.profile = user.home / f".kdlab-chromium-{port}"
        self.log = artifacts / f"chromedriver-{user.name}.log"
        with self.log.open("ab") as log:
            self.service = subprocess.Popen(
                logins.login_argv(user, f"exec {CHROMEDRIVER} --port={port}", within),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=logins.LOGIN_ENV,
                cwd="/",
            )
        self.relay: Relay | None = None
        try:
            if within:
                self.relay = Relay(within, port)
                port = self.relay.port
            self._wait_for_driver(port)
            options = webdriver.ChromeOptions()
            options.binary_location = CHROMIUM
            for argument in (
                "--headless=new",
                f"--user-data-dir={self.profile}",
                "--disable-dev-shm-usage",
                "--disable-gpu",
                f"--window-size={WINDOW[0]},{WINDOW[1]}",
            ):
                options.add_argument(argument)
            self.driver = webdriver.Remote(
                command_executor=f"http://127.0.0.1:{port}", options=options
            )
            # A path typed into a field is text for the page (which hands it
            # to kdlabctl), not a file for Selenium to upload: a Remote driver
            # would try to, by Selenium Grid's command, which chromedriver
            # does not know.
            self.driver.file_detector = UselessFileDetector()
        except BaseException:
            self._end_service()
            raise

    def _wait_for_driver(self, port: int) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            with contextlib.suppress(OSError):
                status = f"http://127.0.0.1:{port}/status"
                with urllib.request.urlopen(status, timeout=2) as answer:
                    if json.load(answer)["value"]["ready"]:
                        return
            if self.service.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"chromedriver of {self.user.name} did not start: "
                    f"{self.log.read_text(errors='replace')}"
                )
            time.sleep(0.2)

    def _end_service(self) -> None:
        """End chromedriver and what it left, and check that no chromium or
        chromedriver of the user survives (they are heavy: one at a time)."""
        if self.service.poll() is None:
            logins.kill(self.service)
        if self.relay is not None:
            self.relay.close()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while (left := processes_of(self.user.uid, BROWSER_PROGRAMS)) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.2)
        shutil.rmtree(self.profile, ignore_errors=True)
        if left:
            for line in left:  # the test user's: started by this browser
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(line.split()[0]), signal.SIGKILL)
            raise AssertionError(f"browser processes outlived quit: {left}")

    def close(self) -> None:
        try:
            self.driver.quit()
        finally:
            self._end_service()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def open(self, url: str) -> None:
        """Load *url* and wait until the page has its first list of VMs."""
        self.driver.get(url)
        self.wait_until(
            lambda: self.text("#status") == "", "the page never reached kdlabd"
        )

    def wait_until(
        self, condition: Callable[[], Any], what: str, timeout: float = WAIT_SECONDS
    ) -> Any:
        """Wait for *condition* to hold (return something true); fail saying *what*."""
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.support.ui import WebDriverWait

        def holds(_driver: object) -> Any:
            with contextlib.suppress(WebDriverException):
                return condition()
            return False

        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.2).until(holds)
        except Exception as err:
            shot = self.screenshot("failure")
            raise AssertionError(
                f"{what} (within {timeout} s); error shown: {self.text('#error')!r}; "
                f"screenshot {shot}"
            ) from err

    def find(self, css: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def exists(self, css: str) -> bool:
        from selenium.webdriver.common.by import By

        return bool(self.driver.find_elements(By.CSS_SELECTOR, css))

    def text(self, css: str) -> str:
        """The text of the element *css* (textContent: also while hidden)."""
        value = self.driver.execute_script(
            "const e = document.querySelector(arguments[0]);"
            " return e ? e.textContent : null;",
            css,
        )
        return "" if value is None else str(value)

    def click(self, css: str) -> None:
        self.wait_until(
            lambda: self.find(css).is_enabled(), f"{css} never became enabled"
        )
        self.find(css).click()

    def wait_for_text(
        self,
        css: str,
        check: Callable[[str], bool],
        what: str,
        timeout: float = WAIT_SECONDS,
    ) -> str:
        """Wait until *check* holds for the text of *css*; that text."""
        return str(
            self.wait_until(
                lambda: (text := self.text(css)) and check(text) and text,
                what,
                timeout,
            )
        )

    def screenshot(self, name: str, *, top: bool = False, show: str = "") -> Path:
        """Save the window as ``ARTIFACTS/NAME.png``, scrolled to the *top* or
        to the element *show*."""
        if top:
            self.driver.execute_script("window.scrollTo(0, 0);")
        if show:
            self.driver.execute_script(
                "document.querySelector(arguments[0]).scrollIntoView();", show
            )
        path = self.artifacts / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def mark(self) -> None:
        """Mark the loaded document, so :meth:`same_document` tells a reload."""
        self.driver.execute_script("window.kdlabTestMark = 'kept';")

    def same_document(self) -> bool:
        return bool(
            self.driver.execute_script("return window.kdlabTestMark === 'kept';")
        )


@contextlib.contextmanager
def browser(
    artifacts: Path, user: LoginUser, within: Sequence[str] = ()
) -> Iterator[Browser]:
    """A :class:`Browser` of *user*'s (in the namespace *within* enters, if
    given), quit at the end whatever happens."""
    session = Browser(artifacts, user, within)
    try:
        yield session
    finally:
        session.close()
