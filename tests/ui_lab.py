"""The course where learners meet it: JupyterLab in a real browser (`make test-ui`).

Starts JupyterLab from the venv on 127.0.0.1 (a free port, a random token) over a copy of notebooks/ (so the
browser's autosave never touches the committed ones; the copy reads the same runs/ cache), and drives Debian's
chromium with Playwright: for each notebook, open it, Run All Cells, wait until every cell has run, fail on any
error output, and save a screenshot to runs/ui/. Before the explorer runs, its text form must tell the learner to
run the cells (JupyterLab 4 does not redraw saved widget state); after running, it picks another graph feature
and moves the steering slider, and checks that the view changes. The server and the browser are stopped whatever
happens. Prints one JSON line; exits 1 on a failure.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "runs" / "ui"
ERRORS = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"]'


def _log(message: str) -> None:
    print(f"[ui {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"JupyterLab did not answer at {url} within {timeout:.0f} s")


def _shutdown_kernels(port: int, token: str) -> None:
    base = f"http://127.0.0.1:{port}/api/kernels"
    for kernel in json.load(urllib.request.urlopen(f"{base}?token={token}", timeout=10)):
        urllib.request.urlopen(urllib.request.Request(f"{base}/{kernel['id']}?token={token}", method="DELETE"), timeout=30)


def _run_all(page, timeout_s: float) -> None:
    """Clear the committed outputs, Run > Run All Cells, then wait until every code cell has run (or one failed)."""
    page.locator(".lm-MenuBar-itemLabel", has_text="Edit").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Clear Outputs of All Cells").first.click()
    page.wait_for_function("() => [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]"
                           ".every(p => !/[0-9]/.test(p.innerText))", timeout=60_000)
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        prompts = page.locator(".jp-CodeCell .jp-InputPrompt").all_inner_texts()
        if prompts and all(p.strip().startswith("[") and p.strip()[1:-2].strip().isdigit() for p in prompts):
            return
        if page.locator(ERRORS).count():
            return
        time.sleep(1)
    raise RuntimeError(f"cells still running after {timeout_s:.0f} s")


def _explore(page) -> dict:
    """Pick the second graph feature and move the steering slider; the summary and the answer line must change."""
    explorer = page.locator(".clt-lite-feature-explorer").first  # not tqdm's HTML widgets, which a cold run also shows
    summary = explorer.locator(".widget-html").first
    answer = explorer.locator(".widget-html").last
    before = (summary.inner_text(), answer.inner_text())
    explorer.locator(".widget-dropdown select").first.select_option(index=1)
    page.wait_for_function("([el, old]) => el.innerText !== old", arg=[summary.element_handle(), before[0]], timeout=120_000)
    handle = explorer.locator(".widget-slider .noUi-handle").first
    handle.focus()
    page.keyboard.press("ArrowRight")
    page.wait_for_function("([el, old]) => !el.innerText.includes(old)", arg=[answer.element_handle(), "x1:"], timeout=120_000)
    return {"summary_before": before[0], "summary_after": summary.inner_text(), "answer_after": answer.inner_text()}


def main(only: list[str] | None = None, timeout_s: float = 900) -> int:
    from playwright.sync_api import sync_playwright

    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser_path is None:
        print("error: chromium not found; `make test-ui` installs it with apt-get", file=sys.stderr)
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    port, token = _free_port(), secrets.token_hex(16)
    report: dict = {"notebooks": {}, "ok": False}
    with tempfile.TemporaryDirectory(prefix="clt-lite-ui-") as workspace, open(OUT / "server.log", "w") as log:
        (Path(workspace) / "notebooks").mkdir()
        for notebook in (ROOT / "notebooks").glob("*.ipynb"):  # only notebooks (a killed kernel may leave sockets)
            shutil.copy(notebook, Path(workspace) / "notebooks")
        (Path(workspace) / "runs").symlink_to(ROOT / "runs")  # ../runs/cpu from the copies is the real cache
        # Render every cell (JupyterLab 4 otherwise draws only those near the viewport), in a settings folder of
        # this run's own, so a learner's JupyterLab settings are neither read nor changed.
        tracker = Path(workspace) / "settings" / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
        tracker.parent.mkdir(parents=True)
        tracker.write_text(json.dumps({"windowingMode": "none"}))
        news = Path(workspace) / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
        news.parent.mkdir(parents=True)
        news.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))  # no pop-up over the screenshots
        env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(Path(workspace) / "settings"))
        server = subprocess.Popen(
            [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip", "127.0.0.1", f"--port={port}",
             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={workspace}"]
            + (["--allow-root"] if os.geteuid() == 0 else []),  # CI containers run as root
            stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_for_server(f"http://127.0.0.1:{port}/api/status?token={token}")
            _log(f"JupyterLab up on 127.0.0.1:{port}")
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
                try:
                    page = browser.new_page(viewport={"width": 1400, "height": 1000})
                    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
                        if only and path.name[:2] not in only:
                            continue
                        start = time.time()
                        # ?reset: a fresh workspace, so only this notebook is open
                        page.goto(f"http://127.0.0.1:{port}/lab/tree/notebooks/{path.name}?reset&token={token}")
                        page.locator(".jp-NotebookPanel").first.wait_for(timeout=120_000)
                        page.locator(".jp-KernelName", has_text="Python").first.wait_for(timeout=120_000)
                        before_running = None
                        if path.name.startswith("06"):  # JupyterLab 4 shows a saved widget's text form until it runs
                            page.locator(".jp-OutputArea-output", has_text="[feature explorer: run").first.wait_for(
                                timeout=30_000)
                            before_running = "the explorer's text form says to run the cells"
                        wrapping = page.locator(".jp-CodeCell .cm-content.cm-lineWrapping").count()
                        if wrapping != page.locator(".jp-CodeCell .cm-content").count():
                            raise RuntimeError(f"{path.name}: code lines do not wrap (lab/overrides.json not installed?)")
                        _log(f"{path.name}: open, running all cells")
                        _run_all(page, timeout_s)
                        errors = page.locator(ERRORS).all_inner_texts()
                        entry = {"seconds": round(time.time() - start), "errors": [e[:300] for e in errors]}
                        if before_running is not None:
                            entry["before_running"] = before_running
                        if path.name.startswith("06") and not errors:
                            entry["explorer"] = _explore(page)
                        page.screenshot(path=str(OUT / f"{path.stem}.png"), full_page=True)
                        _log(f"{path.name}: {entry['seconds']} s, {len(errors)} error output(s)")
                        report["notebooks"][path.name] = entry
                        _shutdown_kernels(port, token)  # one notebook's kernel at a time, as a learner would
                        if errors:
                            raise RuntimeError(f"{path.name}: {errors[0][:200]}")
                    report["ok"] = True
                finally:
                    browser.close()
        except Exception as error:  # one line for the log; the report says which notebook
            report["error"] = f"{type(error).__name__}: {error}".splitlines()[0]
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or None))
