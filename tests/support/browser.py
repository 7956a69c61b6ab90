"""kdlab's Cockpit page in a real browser, for the vm tier.

- :func:`install_page` installs this checkout's page (``kdlabctl/cockpit``
  with xterm.js from ``npm ci``) with ``.ci/cockpit-page``, as ``.ci/install``
  does, into a directory of the test's.
- :class:`PageServer` serves it to the browser as a real login user:
  ``cockpit-ws --local-session=cockpit-bridge`` on loopback, so Cockpit's
  bridge runs as that user, calls kdlabd as that user and spawns that user's
  ``kdlabctl``. The bridge's "system" bus is the test's private bus
  (``DBUS_SYSTEM_BUS_ADDRESS``, which GDBus in the bridge and kdlabctl both
  read), and its ``kdlabctl`` is the user's copy of this checkout.
  :func:`serving_command` is the one place that says how the page is served.
- :class:`Browser` is Debian's headless ``chromium`` driven through its
  ``chromedriver`` by selenium; one at a time (it is heavy), closed by its
  context manager. Screenshots go to :func:`artifacts_dir`.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tests.support import REPO, logins
from tests.support.logins import LoginUser
from tests.support.prereq import require, require_tool
from tests.support.timeouts import STARTUP_TIMEOUT

COCKPIT_WS = "/usr/lib/cockpit/cockpit-ws"
SHELL_MANIFEST = "/usr/share/cockpit/shell/manifest.json"  # Cockpit's menu
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PAGE_SOURCES = REPO / "kdlabctl" / "cockpit"
INSTALL_PAGE = REPO / ".ci" / "cockpit-page"
PAGE_PATH = "/cockpit/@localhost/kdlab/index.html"
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


def serving_command(port: int) -> str:
    """The shell command that serves the page on 127.0.0.1:*port* for the user
    running it, without a login. (When ``kdlabctl web`` serves it, this is
    the place to switch.)"""
    return shlex.join(
        [COCKPIT_WS, "--no-tls", "--local-session=cockpit-bridge",
         "--address", "127.0.0.1", "--port", str(port)]
    )  # fmt: skip


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
    """The page served by Cockpit to the browser, as *user*, on the bus *bus*.

    *root* must be a directory every user may enter (the page and the
    kdlabctl wrapper go there).
    """

    def __init__(self, user: LoginUser, bus: str, root: Path) -> None:
        self.user = user
        self.port = free_port()
        data_home = root / "share"
        install_page(data_home)
        bindir = kdlabctl_wrapper(root / "bin").parent
        environment = {
            "DBUS_SYSTEM_BUS_ADDRESS": bus,
            "XDG_DATA_HOME": str(data_home),
            "PATH": f"{bindir}:{logins.LOGIN_ENV['PATH']}",
        }
        exports = " ".join(
            f"{key}={shlex.quote(value)}" for key, value in environment.items()
        )
        command = f"export {exports} && exec {serving_command(self.port)}"
        self.log = root / "cockpit-ws.log"
        with self.log.open("wb") as log:
            self._proc = subprocess.Popen(
                logins.login_argv(user, command),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=logins.LOGIN_ENV,
                cwd="/",
            )
        self._wait_until_listening()

    @property
    def url(self) -> str:
        """The page's address."""
        return f"http://127.0.0.1:{self.port}{PAGE_PATH}"

    @property
    def shell_url(self) -> str:
        """The address of Cockpit's shell, whose menu lists the page."""
        return f"http://127.0.0.1:{self.port}/"

    def _wait_until_listening(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1),
            ):
                return
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"cockpit-ws did not listen:\n{self.output()}")
            time.sleep(0.1)

    def output(self) -> str:
        """What cockpit-ws and the bridge wrote so far."""
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self._proc.poll() is None:
            logins.kill(self._proc)


class Browser:
    """Headless chromium on the page, driven by selenium through chromedriver."""

    def __init__(self, artifacts: Path) -> None:
        from selenium import webdriver

        self.artifacts = artifacts
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for argument in (
            "--headless=new",
            "--no-sandbox",  # the tests run as root
            "--disable-dev-shm-usage",
            "--disable-gpu",
            f"--window-size={WINDOW[0]},{WINDOW[1]}",
        ):
            options.add_argument(argument)
        service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
        self.driver = webdriver.Chrome(options=options, service=service)

    def close(self) -> None:
        self.driver.quit()

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
def browser(artifacts: Path) -> Iterator[Browser]:
    """A :class:`Browser`, quit at the end whatever happens."""
    session = Browser(artifacts)
    try:
        yield session
    finally:
        session.close()
