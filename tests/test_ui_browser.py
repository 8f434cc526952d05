"""
C{claudemesh ui} in a real browser: Debian's headless Chromium driven by
Selenium through Debian's chromedriver, against a real broker (C{twistd})
with three members, each a separate config directory using the real CLI.

It skips, saying why, where Chromium, chromedriver or Selenium is missing
(C{.ci/run} installs them). With C{CLAUDEMESH_UI_SCREENSHOT=path} set it
saves a screenshot of the page there (docs/ui.md shows the one CI took).

Every process (broker, listeners, the UI server, the browser) is stopped
after each test.
"""

import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.test_cli_commands import claudemesh_command
from tests.test_mcp_server import BrokerProcessMixin

CHROMIUM = os.environ.get("CLAUDEMESH_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CLAUDEMESH_CHROMEDRIVER", "/usr/bin/chromedriver")
HOSTILE = "<img src=x onerror=alert(1)>"
KICKED = "Kicked from this mesh. Run claudemesh to rejoin."


def browser_skip_reason():
    """
    Why the browser test cannot run here, or C{None}.
    """
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "no browser: the selenium package is not installed (pip install -e '.[test]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return "no browser: %s is missing (apt-get install %s)" % (path, package)
    return None


class LineReader:
    """
    The lines a subprocess writes to one stream, read by a thread.
    """

    def __init__(self, stream):
        self.lines = queue.Queue()
        self.seen = []
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream):
        for line in stream:
            self.lines.put(line.decode("utf-8", "replace"))
        self.lines.put(None)

    def wait_for(self, predicate, timeout=20):
        import time

        deadline = time.time() + timeout
        for line in self.seen:
            if predicate(line):
                return line
        while True:
            left = deadline - time.time()
            if left <= 0:
                raise AssertionError("no such line within %ss; saw %r" % (timeout, self.seen))
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError("the stream closed; saw %r" % (self.seen,))
            self.seen.append(line)
            if predicate(line):
                return line


class BrowserTests(BrokerProcessMixin, SynchronousTestCase):
    """
    An owner watches and steers the mesh from the page while bob and a
    member with a hostile display name use the CLI.
    """

    def setUp(self):
        reason = browser_skip_reason()
        if reason is not None:
            raise SkipTest(reason)
        self.start_broker()
        self.ok("owner", "new", "team", "--name", "owner")
        for who, name in (("bob", "bob"), ("carol", HOSTILE)):
            link = self.invite()
            self.ok(who, "join", link, "--name", name)
        self.owner_listen = self.spawn("owner", "listen")
        self.bob_listen = self.spawn("bob", "listen")
        self.carol_listen = self.spawn("carol", "listen")
        self.ui = self.spawn("owner", "ui", "--no-open")
        line = self.ui.out.wait_for(lambda text: "token=" in text)
        self.url = re.search(r"http://127\.0\.0\.1:\d+/\?token=\S+", line).group(0)
        self.driver = self.start_browser()

    def invite(self):
        import json

        return json.loads(self.ok("owner", "invite", "--json"))["link"]

    def spawn(self, who, *args):
        """
        A long-lived C{claudemesh} process of C{who}, its output read by
        threads.
        """
        workdir = os.path.join(self.tmp, who, "work")
        os.makedirs(workdir, exist_ok=True)
        process = subprocess.Popen(claudemesh_command() + list(args), env=self.env(who),
                                   cwd=workdir, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        process.out = LineReader(process.stdout)
        process.err = LineReader(process.stderr)

        def stop():
            # Stopped first: closing a pipe a reader thread still reads blocks.
            self.stop_process(process)
            for reader, stream in ((process.out, process.stdout), (process.err, process.stderr)):
                reader.thread.join(10)
                stream.close()

        self.addCleanup(stop)
        return process

    def start_browser(self):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        profile = tempfile.mkdtemp(prefix="claudemesh-chromium-")
        self.addCleanup(shutil.rmtree, profile, True)
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless", "--no-sandbox", "--disable-gpu",
                     "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                     "--window-size=1500,1000", "--user-data-dir=" + profile):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER),
                                  options=options)
        self.addCleanup(driver.quit)
        driver.set_page_load_timeout(30)
        return driver

    def wait(self, condition, timeout=20, what="the page"):
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, timeout).until(
            lambda d: condition(d), message="timed out waiting for " + what)

    def find(self, selector):
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, selector)

    def members(self):
        """
        What the members list shows now, read in one go in the page (the
        list is rebuilt as presence changes, so element handles go stale).
        """
        return self.driver.execute_script("""
            return Array.from(document.querySelectorAll('#members .member')).map((row) => ({
              name: row.querySelector('.member-line .name').textContent,
              pubkey: row.dataset.pubkey,
              text: row.textContent,
              statuses: Array.from(row.querySelectorAll('.session')).map((s) => s.dataset.status),
              details: Array.from(row.querySelectorAll('.status-detail')).map((s) => s.textContent),
              images: row.querySelectorAll('img').length,
            }));""")

    def member(self, name):
        rows = [row for row in self.members() if row["name"] == name]
        return rows[0] if rows else None

    def session_status(self, name):
        row = self.member(name)
        return row["statuses"][0] if row and row["statuses"] else None

    def click(self, find, what):
        """
        Click the element C{find()} returns, looking it up again if the page
        rebuilt it meanwhile.
        """
        from selenium.common.exceptions import StaleElementReferenceException

        def clicked(driver):
            try:
                element = find()
                if element is None:
                    return False
                element.click()
                return True
            except StaleElementReferenceException:
                return False

        self.wait(clicked, what=what)

    def in_member(self, name, selector):
        for row in self.find("#members .member"):
            if row.find_element("css selector", ".member-line .name").text == name:
                return row.find_element("css selector", selector)
        return None

    def test_watch_talk_and_kick(self):
        """The page shows members, live status, messages both ways, a kick (4001), text as text."""
        driver = self.driver
        driver.get(self.url)
        self.wait(lambda d: self.find("#state") and self.find("#state")[0].text == "connected",
                  what="connected")

        # Members and their live sessions; the hostile name is text, not markup.
        self.wait(lambda d: self.session_status("bob") == "idle", what="bob idle")
        self.wait(lambda d: self.member(HOSTILE) is not None, what="carol listed")
        carol = self.member(HOSTILE)
        self.assertEqual(carol["statuses"], ["idle"])
        self.assertEqual(carol["images"], 0)
        self.assertEqual(driver.execute_script(
            "return document.querySelectorAll('img:not(#invite-qr)').length"), 0)

        # Another member's status change shows up live, with its source.
        self.ok("bob", "status", "working")
        self.wait(lambda d: self.session_status("bob") == "working", what="bob working")
        self.assertTrue(self.member("bob")["details"][0].startswith("manual · "),
                        self.member("bob"))
        self.ok("bob", "summary", "reviewing <b>the</b> parser")
        self.wait(lambda d: "reviewing <b>the</b> parser" in self.member("bob")["text"],
                  what="bob's summary")

        # A message from the CLI reaches the owner's session and the page.
        self.ok("bob", "send", "owner", "hello from the cli")
        self.owner_listen.out.wait_for(lambda line: "hello from the cli" in line)
        bob_key = self.member("bob")["pubkey"]
        self.click(lambda: self.find(
            '#conversations li[data-conversation="%s"] button' % (bob_key,))[0],
            what="bob's conversation")
        self.wait(lambda d: "hello from the cli" in self.find("#messages")[0].text,
                  what="the CLI's message on the page")

        # A message from the page reaches the CLI (priority now: bob is
        # working), and its delivery state on the page updates.
        from selenium.webdriver.support.ui import Select

        self.find("#send-to")[0].clear()
        self.find("#send-to")[0].send_keys("bob")
        Select(self.find("#send-priority")[0]).select_by_value("now")
        self.find("#send-text")[0].send_keys("hello from the page")
        self.find("#send-button")[0].click()
        self.bob_listen.out.wait_for(lambda line: "hello from the page" in line)
        self.wait(lambda d: driver.execute_script("""
            return Array.from(document.querySelectorAll('#messages .message.sent')).some((m) =>
              m.textContent.includes('hello from the page') &&
              m.querySelector('.delivery').textContent === 'delivered');"""),
                  what="delivered on the page")

        # The owner's moderation panel: an invite with its link and QR code,
        # and the audit chain checked.
        self.find("#invite-button")[0].click()
        self.wait(lambda d: self.find("#invite-link")[0].get_attribute("value").startswith(
            "claudemesh://join/"), what="the invite link")
        self.assertTrue(self.find("#invite-qr")[0].get_attribute("src").startswith(
            "data:image/svg+xml"))
        self.wait(lambda d: driver.execute_script(
            "return document.querySelector('#invite-qr').naturalWidth") > 0, what="the QR code")
        self.wait(lambda d: self.find("#audit-valid")[0].text.startswith("✓"),
                  what="audit verified")
        screenshot = os.environ.get("CLAUDEMESH_UI_SCREENSHOT")
        if screenshot:
            driver.save_screenshot(screenshot)

        # A kick from the page, confirmed, ends bob's session with 4001.
        self.click(lambda: self.in_member("bob", "button.kick"), what="bob's kick button")
        self.wait(lambda d: self.find("#confirm-dialog")[0].get_attribute("open") is not None,
                  what="the confirmation")
        self.assertIn('Kick "bob"?', self.find("#confirm-text")[0].text)
        self.find("#confirm-yes")[0].click()
        self.assertEqual(self.bob_listen.wait(timeout=20), 1)
        self.bob_listen.err.wait_for(lambda line: KICKED in line)
        self.wait(lambda d: self.session_status("bob") is None, what="bob's session gone")
        self.wait(lambda d: "kick: bob" in self.find("#notice")[0].text, what="the notice")
        self.assertIsNone(self.carol_listen.poll())

    def test_ban_rotates_the_key(self):
        """A ban from the page rotates the mesh key: bob reads what follows, the banned is out."""
        driver = self.driver
        driver.get(self.url)
        self.wait(lambda d: self.find("#state") and self.find("#state")[0].text == "connected",
                  what="connected")
        self.wait(lambda d: self.find("#key-epoch")[0].text == "key epoch 0",
                  what="key epoch 0")
        self.assertFalse(self.find("#key-notice")[0].is_displayed())
        self.wait(lambda d: self.member(HOSTILE) is not None, what="carol listed")
        self.click(lambda: self.in_member(HOSTILE, "button.ban"), what="carol's ban button")
        self.wait(lambda d: self.find("#confirm-dialog")[0].get_attribute("open") is not None,
                  what="the confirmation")
        self.assertIn("the mesh key is rotated", self.find("#confirm-text")[0].text)
        self.find("#confirm-yes")[0].click()
        self.wait(lambda d: "mesh key rotated to epoch 1" in self.find("#notice")[0].text,
                  what="the rotation notice")
        self.wait(lambda d: self.find("#key-epoch")[0].text == "key epoch 1",
                  what="key epoch 1")
        self.assertEqual(self.carol_listen.wait(timeout=20), 1)
        # bob's listen fetched the new key; a broadcast under it reaches him.
        self.ok("owner", "send", "*", "after the ban")
        line = self.bob_listen.out.wait_for(lambda text: "after the ban" in text)
        self.assertNotIn("cannot decrypt", line)
        self.assertFalse(self.find("#key-notice")[0].is_displayed())
        # A rotation from the page's button.
        self.find("#rotate-key")[0].click()
        self.wait(lambda d: self.find("#confirm-dialog")[0].get_attribute("open") is not None,
                  what="the confirmation")
        self.find("#confirm-yes")[0].click()
        self.wait(lambda d: self.find("#key-epoch")[0].text == "key epoch 2",
                  what="key epoch 2")
