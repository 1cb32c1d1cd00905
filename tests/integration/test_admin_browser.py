"""The admin status page in a real headless browser (Debian chromium driven by npm playwright-core, as the viewer
test does), over a real node's database: DCMTK storescu sends a short chest CT to the node, whose gate refuses it
(too few slices), so the node's "not processed" SR goes to a PACS that is down and is dead-lettered within
seconds. A person then opens the page, sees the series with its route and the dead delivery with its error, types
a wrong token (refused, nothing changed), types the right one and presses Retry: the delivery is pending again;
Orthanc comes up as the PACS after the click, and the page then shows the delivery delivered.

The page is served by `node.admin.admin_routes` in this test's own uvicorn server (`node.http.HttpServer`) over the
node's database, with the node's token, until the node's HTTP app mounts ``/admin`` itself. A full-page screenshot
of the dead letter lands in the test's tmp dir; ``PACSNODE_UPDATE_DOCS=1`` copies it to docs/admin.png.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.routing import Mount

from node.admin import admin_routes
from node.config import load_config
from node.db import create_engine_for
from node.dispatch import Dispatcher, deliveries
from node.http import HttpServer
from node.index import Index
from node.queue import JobQueue
from peers import dcmtk
from peers.orthanc import OrthancServer
from tests.conftest import (
    REPO,
    TEST_WEIGHTS_DIR,
    free_port,
    require_tool,
    require_weights,
    wait_for_port,
    wait_until,
)
from tests.ctgen import write_ct_series
from tests.integration.test_viewer_browser import _playwright_core

pytestmark = pytest.mark.integration

TOKEN = "admin-browser-token-4711"
GIVE_UP_SECONDS = 6  # a delivery to the down PACS is dead this long after it was queued (and after a retry)

# Drives the page like a person: CommonJS, so it can require the repository's pinned playwright-core by path.
ADMIN_CHECK_JS = r"""
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { chromium } = require(process.env.PLAYWRIGHT_CORE);

const plan = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const results = { errors: [], timings: {} };
const t0 = Date.now();
const lap = (name) => { results.timings[name] = (Date.now() - t0) / 1000; };
const done = () => fs.writeFileSync(path.join(plan.outDir, 'results.json'), JSON.stringify(results, null, 2));

(async () => {
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'pacsnode-admin-chromium-'));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: plan.chromium, headless: true, viewport: { width: 1400, height: 1000 },
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
           '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  try {
    const page = context.pages()[0] ?? await context.newPage();
    page.setDefaultTimeout(plan.timeoutMs);
    page.on('pageerror', (e) => results.errors.push(`pageerror: ${e.message}`));
    let refusing = false;  // the browser logs the 401 it is meant to get for the wrong token
    page.on('console', (m) => {
      if (m.type() === 'error' && !(refusing && /status of 401/.test(m.text()))) results.errors.push(`console: ${m.text()}`);
    });
    const row = `#delivery-${plan.deliveryId}`;
    const retryButton = `button[name="delivery"][value="${plan.deliveryId}"]`;

    await page.goto(`${plan.baseUrl}/admin/`);
    await page.waitForSelector(row);
    lap('page');
    results.before = {
      title: await page.title(),
      seriesRow: await page.locator('tr', { hasText: plan.seriesUid }).first().innerText(),
      deadRow: await page.locator(row).innerText(),
      deliveriesTable: await page.locator('#deliveries + table').innerText(),
    };
    await page.screenshot({ path: path.join(plan.outDir, 'admin-dead.png'), fullPage: true });

    await page.fill('#token', 'not-the-token');
    refusing = true;
    const [refused] = await Promise.all([
      page.waitForResponse((r) => r.url().endsWith('/admin/retry')), page.click(retryButton)]);
    await page.waitForLoadState();
    results.wrongToken = { status: refused.status(), heading: await page.locator('h1').innerText() };
    refusing = false;

    await page.goto(`${plan.baseUrl}/admin/`);
    await page.fill('#token', plan.token);
    await Promise.all([page.waitForURL(/deliveries_retried=/), page.click(retryButton)]);
    lap('clicked');
    results.after = {
      url: page.url(),
      notice: await page.locator('.notice').innerText(),
      deadRowGone: (await page.locator(row).count()) === 0,
      seriesRow: await page.locator('tr', { hasText: plan.seriesUid }).first().innerText(),
    };
    fs.writeFileSync(path.join(plan.outDir, 'clicked.json'), '{}');

    // The test brings the PACS up now; a person reloads until the delivery shows as delivered.
    const deadline = Date.now() + plan.timeoutMs;
    let seriesRow = '';
    while (Date.now() < deadline) {
      await page.goto(`${plan.baseUrl}/admin/`);
      seriesRow = await page.locator('tr', { hasText: plan.seriesUid }).first().innerText();
      if (/pacs: delivered/.test(seriesRow)) break;
      await page.waitForTimeout(300);
    }
    lap('delivered');
    results.final = { seriesRow, deliveriesTable: await page.locator('#deliveries + table').innerText() };
    await page.screenshot({ path: path.join(plan.outDir, 'admin-delivered.png'), fullPage: true });
  } catch (e) {
    results.errors.push(`driver: ${e.stack || e}`);
  } finally {
    await context.close();
    done();
  }
})();
"""


def _node_toml(pacs: OrthancServer) -> str:
    weights = f'[worker]\nweights_dir = "{TEST_WEIGHTS_DIR}"\n' if TEST_WEIGHTS_DIR else ""
    # The first line continues the launcher's [node] table.
    return f'dicomweb_token = "{TOKEN}"\n' + weights + f"""
[completion]
sweep_seconds = 0.2
[[completion.senders]]
calling_ae = "CT-SCANNER"
mode = "release"
release_grace_seconds = 0.2
[gate]
min_slices = 16
[dispatch]
initial_backoff_seconds = 0.2
max_backoff_seconds = 0.5
give_up_after_seconds = {GIVE_UP_SECONDS}
poll_seconds = 0.2
timeout_seconds = 5
[[destinations]]
name = "pacs"
kind = "dimse"
ae_title = "{pacs.aet}"
host = "127.0.0.1"
port = {pacs.dicom_port}
"""


@pytest.mark.browser
@pytest.mark.one_backend  # dead-lettering and retry run on both backends in tests/unit/test_dispatch.py
def test_the_admin_page_in_chromium_shows_a_dead_letter_that_its_retry_button_brings_back(start_node, tmp_path):
    require_weights()  # the node's worker loads its models before it takes any job
    chromium = require_tool("chromium")
    node_js = require_tool("node")
    _playwright_core()
    t0 = time.monotonic()

    pacs = OrthancServer(tmp_path / "orthanc")  # its ports are chosen now; it starts only after the click
    node = start_node(extra_toml=_node_toml(pacs))
    made = write_ct_series(tmp_path / "ct", slices=8, size=32, seed=4711)  # < min_slices: refused, "not processed" SR
    dcmtk.storescu(node.port, tmp_path / "ct", called_ae=node.ae_title, calling_ae="CT-SCANNER", check=True, timeout=60)

    config = load_config(node.config_path, environ={})
    engine = create_engine_for(config.database_url)

    def delivery() -> Any:
        with engine.connect() as conn:
            return conn.execute(sa.select(deliveries).where(deliveries.c.series_uid == made.series_uid)).first()

    server = None
    try:
        dead = wait_until(lambda: (row := delivery()) is not None and row.state == "dead" and row, 60,
                          "the delivery to the down PACS to be dead-lettered", process=node.proc)
        assert dead.destination == "pacs" and "gave up after" in dead.last_error

        routes = admin_routes(lambda: config, engine, token=TOKEN, dispatcher=Dispatcher(config, engine, {}),
                              queue=JobQueue(engine, config.queue), index=Index(engine))
        served = config.model_copy(update={"node": config.node.model_copy(update={"http_port": free_port()})})
        server = HttpServer(served, Starlette(routes=[Mount("/admin", routes=routes)]), graceful_seconds=2)
        server.start()

        out = tmp_path / "browser"
        out.mkdir()
        script, plan_path = tmp_path / "admin-check.cjs", tmp_path / "plan.json"
        script.write_text(ADMIN_CHECK_JS)
        plan_path.write_text(json.dumps({
            "baseUrl": f"http://127.0.0.1:{server.port}", "token": TOKEN, "seriesUid": made.series_uid,
            "deliveryId": dead.id, "outDir": str(out), "timeoutMs": 30000, "chromium": chromium,
        }))
        env = {**os.environ, "PLAYWRIGHT_CORE": str(REPO / "demo" / "node_modules" / "playwright-core")}
        with (tmp_path / "browser.log").open("wb") as log:
            browser = subprocess.Popen([node_js, str(script), str(plan_path)], stdout=log, stderr=subprocess.STDOUT,
                                       env=env)
        try:
            wait_until(lambda: (out / "clicked.json").exists(), 60, "the retry click", process=browser)
            assert delivery().state in ("pending", "sending")  # back in the queue; the PACS is still down
            pacs.start()
            browser.wait(timeout=60)
        finally:
            if browser.poll() is None:
                browser.kill()
                browser.wait()
        results = json.loads((out / "results.json").read_text())
        final_state = delivery().state
    finally:
        if server is not None:
            server.stop(5)
        engine.dispose()
        pacs.stop()

    assert not results["errors"], results["errors"] + [(tmp_path / "browser.log").read_text()[-2000:]]
    before = results["before"]
    assert made.series_uid in before["seriesRow"] and "chest-ct" in before["seriesRow"]
    assert "skipped" in before["seriesRow"] and "pacs: dead" in before["seriesRow"]
    assert "gave up after" in before["deadRow"] and "pacs" in before["deadRow"]
    assert "pacs" in before["deliveriesTable"] and "pacs" in results["final"]["deliveriesTable"]
    assert results["wrongToken"]["status"] == 401 and "token" in results["wrongToken"]["heading"]
    after = results["after"]
    assert "Queued again: 1 deliveries, 0 jobs." in after["notice"] and after["deadRowGone"]
    assert "pacs: delivered" in results["final"]["seriesRow"], results["final"]
    assert final_state == "delivered"
    if os.environ.get("PACSNODE_UPDATE_DOCS") == "1":
        shutil.copyfile(out / "admin-dead.png", REPO / "docs" / "admin.png")
    assert time.monotonic() - t0 < 60, f"took {time.monotonic() - t0:.0f} s"



def test_the_node_itself_serves_the_admin_page_once_it_mounts_it(start_node):
    """The node's own HTTP port: skipped while its app does not mount ``/admin`` yet (then 404)."""
    node = start_node(extra_toml=f'dicomweb_token = "{TOKEN}"\n[worker]\nenabled = false\n')
    base = f"http://127.0.0.1:{node.http_port}/admin"
    wait_for_port(node.http_port, process=node.proc)

    def call(path: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, str]:
        request = urllib.request.Request(base + path, data=data, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    status, page = call("/")
    assert status == 200 and "pacs-ai-node status" in page and "Retry actions are off" not in page
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    assert call("/retry", b"all=deliveries", form)[0] == 401
    status, body = call("/retry", b"all=deliveries", {**form, "Authorization": f"Bearer {TOKEN}"})
    assert (status, json.loads(body)) == (200, {"deliveries": 0, "jobs": 0})
