"""A minimal Chrome DevTools protocol driver for the browser tests: headless Debian ``chromium``, one page,
console errors collected, JavaScript evaluated, screenshots written. Uses ``websocket-client`` only.

>>> with Browser.start() as b:                                   # doctest: +SKIP
...     b.open("file:///tmp/page.html"); b.eval("document.title")
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio"]


def find_chromium() -> str | None:
    """The chromium executable (``HALTRACE_CHROMIUM``, then ``chromium`` / ``chromium-browser`` on PATH)."""
    env = os.environ.get("HALTRACE_CHROMIUM")
    if env and Path(env).exists():
        return env
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    def __init__(self, proc: subprocess.Popen, profile: str, ws: Any):
        self.proc, self.profile, self.ws = proc, profile, ws
        self._id = 0
        self.errors: list[str] = []
        self.events: list[dict[str, Any]] = []

    @classmethod
    def start(cls, executable: str | None = None, width: int = 1280, height: int = 1500,
              timeout: float = 60.0) -> Browser:
        import websocket

        exe = executable or find_chromium()
        if exe is None:
            raise FileNotFoundError("chromium not found")
        profile = tempfile.mkdtemp(prefix="haltrace-chromium-")
        proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
                                 f"--window-size={width},{height}", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port, began = None, time.time()
        port_file = Path(profile) / "DevToolsActivePort"
        while port is None and time.time() - began < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            if port_file.is_file() and port_file.read_text().strip():
                port = int(port_file.read_text().split()[0])
            else:
                time.sleep(0.1)
        if port is None:
            proc.kill()
            raise TimeoutError("chromium did not open its DevTools port")
        ws_url = None
        while ws_url is None and time.time() - began < timeout:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=5) as r:
                    pages = [t for t in json.load(r) if t.get("type") == "page"]
                ws_url = pages[0]["webSocketDebuggerUrl"] if pages else None
            except OSError:
                pass
            if ws_url is None:
                time.sleep(0.1)
        if ws_url is None:
            proc.kill()
            raise TimeoutError("chromium has no page target")
        b = cls(proc, profile, websocket.create_connection(ws_url, timeout=timeout, suppress_origin=True))
        for domain in ("Runtime.enable", "Log.enable", "Page.enable"):
            b.send(domain)
        return b

    # -------------------------------------------------------------------------------------- protocol
    def _note(self, msg: dict[str, Any]) -> None:
        self.events.append(msg)
        method, p = msg.get("method"), msg.get("params", {})
        if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            self.errors.append("console.error: " + " ".join(str(a.get("value", a.get("description", "")))
                                                             for a in p.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            self.errors.append("exception: " + str(d.get("exception", {}).get("description") or d.get("text")))
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            self.errors.append("log: " + p["entry"].get("text", ""))

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        ident = self._id
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == ident:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self._note(msg)

    def wait_for(self, method: str, timeout: float = 60.0) -> dict[str, Any]:
        began = time.time()
        for msg in self.events:
            if msg.get("method") == method:
                return msg
        while time.time() - began < timeout:
            msg = json.loads(self.ws.recv())
            self._note(msg)
            if msg.get("method") == method:
                return msg
        raise TimeoutError(method)

    # -------------------------------------------------------------------------------------- actions
    def open(self, url: str, timeout: float = 60.0) -> None:
        self.events.clear()
        self.send("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired", timeout)

    def eval(self, expression: str) -> Any:
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression!r} raised {r['exceptionDetails']}")
        return r.get("result", {}).get("value")

    def drain(self, seconds: float = 0.3) -> None:
        """Read pending events (console messages) for ``seconds``."""
        self.ws.settimeout(0.05)
        end = time.time() + seconds
        try:
            while time.time() < end:
                try:
                    self._note(json.loads(self.ws.recv()))
                except Exception as exc:  # a read timeout: nothing pending
                    if "timed out" not in str(exc).lower() and not re.search("timeout", type(exc).__name__, re.I):
                        raise
        finally:
            self.ws.settimeout(60)

    def screenshot(self, path: str | Path) -> Path:
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
