// Drive the OHIF viewer of `pacsnode demo` in Debian's headless chromium (playwright-core, no browser download) and
// measure what a person would see: the study list rows, and per study the rendered viewport with and without the
// AI results. Usage: node demo/viewer-check.mjs PLAN.json
//
// PLAN.json: {"baseUrl", "outDir", "timeoutMs", "studies": [{"name", "label": "pneumonia"|"normal", "caseId",
//   "studyUid", "ctSeriesUid", "segSeriesUid", "srSeriesUid", "outlineSopUid"}]}
// Writes OUTDIR/results.json (also printed) and PNG screenshots in OUTDIR; the caller asserts on the numbers.
// Every wait is on a condition (text in the page, pixels in the viewport canvas, elements in its SVG layer) with a
// timeout; a wait that times out is recorded (`timedOut`) with the last measurement, and the run goes on.
// Exit status: 0 when the run completed (whatever it measured), 1 when the browser or a page could not be driven.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const CHROMIUM_FLAGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync', '--enable-unsafe-swiftshader',
];
// Installed in every page as window.__pacsnodePixels(): counts pixels of the viewport canvas. The node's SEG
// recommends red (255,40,40) for the lesion and blue (80,160,255) for the lungs; OHIF blends each fill over what is
// below (grey CT, and the lungs under a lesion: about (167,115,151) measured), so "lesion" is red above blue and
// well above green, "lungs" is blue well above red, "lit" is anything not black.
const INSTALL_PIXEL_COUNTER = () => {
  window.__pacsnodePixels = () => {
    const viewport = window.cornerstone?.getRenderingEngines().flatMap(e => e.getViewports()).find(v => v.getImageIds);
    if (!viewport || !viewport.getImageIds().length) return null;
    const canvas = viewport.getCanvas();
    const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    let red = 0, blue = 0, lit = 0;
    for (let i = 0; i < data.length; i += 4) {
      const r = data[i], g = data[i + 1], b = data[i + 2];
      if (r + g + b > 60) lit++;
      if (r > 120 && r - g > 40 && r > b) red++;
      if (b > 120 && b - r > 50) blue++;
    }
    return { red, blue, lit, total: canvas.width * canvas.height, index: viewport.getCurrentImageIdIndex(),
             images: viewport.getImageIds().length };
  };
};

const plan = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const timeout = plan.timeoutMs ?? 60000;
fs.mkdirSync(plan.outDir, { recursive: true });
const results = { studyList: {}, studies: {}, timings: {}, errors: [] };
const t0 = Date.now();
const lap = (name) => { results.timings[name] = (Date.now() - t0) / 1000; };

const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'pacsnode-chromium-'));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  headless: true,
  args: CHROMIUM_FLAGS,
  viewport: { width: 1280, height: 800 },
});
// The onboarding tour would block every click; the investigational-use banner would cover the viewport's bottom.
await context.addInitScript(INSTALL_PIXEL_COUNTER);
await context.addInitScript(() => {
  localStorage.setItem('shownTours', '["basicViewerTour"]');
  sessionStorage.setItem('investigationalUseDialog', 'hidden');
});
const page = context.pages()[0] ?? await context.newPage();
page.setDefaultTimeout(timeout);
page.on('pageerror', (e) => results.errors.push(`pageerror: ${e.message}`.slice(0, 500)));

const viewerUrl = (study, series) =>
  `${plan.baseUrl}/viewer?StudyInstanceUIDs=${study.studyUid}&initialSeriesInstanceUID=${series}`;
const shot = async (name) => {
  const file = path.join(plan.outDir, `${name}.png`);
  await page.screenshot({ path: file });
  return file;
};

/** Wait until the viewport shows its images and return how many there are. */
async function waitForViewport() {
  const handle = await page.waitForFunction(() => {
    const v = window.cornerstone?.getRenderingEngines().flatMap(e => e.getViewports()).find(v => v.getImageIds);
    return v && v.getImageIds().length > 0 ? v.getImageIds().length : false;
  }, null, { polling: 100 });
  return handle.jsonValue();
}

/** Show image `index` of the stack and wait for its render: with a segmentation loaded, for cornerstone's
 *  SEGMENTATION_RENDERED of this viewport (the labelmap is drawn after the image), else for IMAGE_RENDERED.
 *  Returns which event came, or 'timeout'. */
async function showImage(index, withSegmentation) {
  return page.evaluate(async ([i, withSeg]) => {
    const cs = window.cornerstone;
    const v = cs.getRenderingEngines().flatMap(e => e.getViewports()).find(v => v.getImageIds);
    const rendered = new Promise((resolve) => {
      const timer = setTimeout(() => resolve('timeout'), 15000);
      if (withSeg) {
        const name = window.cornerstoneTools.Enums.Events.SEGMENTATION_RENDERED;
        const listener = (evt) => {
          if (evt.detail.viewportId !== v.id || v.getCurrentImageIdIndex() !== i) return;
          cs.eventTarget.removeEventListener(name, listener);
          clearTimeout(timer);
          resolve('segmentation');
        };
        cs.eventTarget.addEventListener(name, listener);
      } else {
        v.element.addEventListener(cs.Enums.Events.IMAGE_RENDERED, () => { clearTimeout(timer); resolve('image'); },
                                   { once: true });
      }
    });
    if (v.getCurrentImageIdIndex() === i) v.render(); else await v.setImageIdIndex(i);
    return rendered;
  }, [index, withSegmentation]);
}

/** Index in the stack of the image whose SOP Instance UID is `sop` (-1 if absent). */
async function indexOfSop(sop) {
  return page.evaluate((uid) => {
    const v = window.cornerstone.getRenderingEngines().flatMap(e => e.getViewports()).find(v => v.getImageIds);
    return v.getImageIds().findIndex(id => id.includes(`/instances/${uid}/`));
  }, sop);
}

/** Wait until image `index` is shown with at least `want` = {red, blue, litFraction} pixels; returns the counts
 *  then, or the last counts with `timedOut` set. */
async function waitForPixels(index, want, ms = timeout) {
  const met = await page.waitForFunction(([i, w]) => {
    const c = window.__pacsnodePixels();
    const ok = c && c.index === i && c.red >= (w.red ?? 0) && c.blue >= (w.blue ?? 0)
      && c.lit >= (w.litFraction ?? 0) * c.total;
    return ok && c;
  }, [index, want], { polling: 100, timeout: ms }).then(h => h.jsonValue()).catch(() => null);
  return met ? { ...met, timedOut: false } : { ...(await page.evaluate(() => window.__pacsnodePixels())), timedOut: true };
}

/** Open the viewer on the SEG series and accept OHIF's "open this Segmentation?" prompt; returns segment labels. */
async function openSegmentation(study) {
  await page.goto(viewerUrl(study, study.segSeriesUid));
  await page.getByText('Do you want to open this Segmentation?').waitFor();
  await page.getByRole('button', { name: 'Yes' }).click();
  const handle = await page.waitForFunction(() => {
    const segs = window.services?.segmentationService?.getSegmentations() ?? [];
    return segs.length > 0 && segs.map(s => Object.values(s.segments).filter(Boolean).map(x => x.label));
  }, null, { polling: 100 });
  return (await handle.jsonValue()).flat();
}

const LIT_IMAGE = { litFraction: 0.05 };  // the CT is drawn
const LUNGS_SHOWN = { blue: 200 };  // the SEG overlay is drawn on this slice
const LESION_SHOWN = { blue: 200, red: 500 };

try {
  // 1. The study list: one row per study, with the modalities OHIF got from Orthanc's QIDO-RS.
  await page.goto(`${plan.baseUrl}/`);
  for (const study of plan.studies) {
    const row = page.locator('tr', { hasText: study.caseId }).first();
    await row.waitFor();
    await page.waitForFunction(
      ([id, want]) => [...document.querySelectorAll('tr')].some(r => r.innerText.includes(id) && r.innerText.includes(want)),
      [study.caseId, 'CT\\SEG\\SR'], { polling: 200, timeout: 20000 },
    ).catch(() => {});
    results.studyList[study.name] = (await row.innerText()).replace(/\s+/g, ' ').trim();
  }
  results.studyList.screenshot = await shot('study-list');
  lap('studyList');

  for (const study of plan.studies) {
    const out = { label: study.label };
    results.studies[study.name] = out;
    if (study.label === 'pneumonia') {
      // 2a. The CT alone, on the slice the SR outlines: nothing lesion-coloured before the SEG is shown.
      await page.goto(viewerUrl(study, study.ctSeriesUid));
      out.images = await waitForViewport();
      out.keyIndex = study.outlineSopUid ? await indexOfSop(study.outlineSopUid) : Math.floor(out.images / 2);
      const ctRendered = await showImage(out.keyIndex, false);
      out.ctOnly = { ...await waitForPixels(out.keyIndex, LIT_IMAGE), rendered: ctRendered };
      out.ctOnly.screenshot = await shot(`${study.name}-ct`);
      lap(`${study.name}-ct`);
      // 2b. The SEG loaded on the CT: the lesion overlay on the same slice.
      out.segments = await openSegmentation(study);
      await waitForViewport();
      const segRendered = await showImage(out.keyIndex, true);
      out.withSeg = { ...await waitForPixels(out.keyIndex, LESION_SHOWN, 30000), rendered: segRendered };
      out.withSeg.screenshot = await shot(`${study.name}-seg`);
      lap(`${study.name}-seg`);
      // 2c. The SR in OHIF's SR viewport: the lesion outline (an SVG polyline) with its area.
      await page.goto(viewerUrl(study, study.srSeriesUid));
      const outline = await page.waitForFunction(() => {
        const layer = document.querySelector('svg.svg-layer');
        if (!layer) return false;
        const shapes = [...layer.querySelectorAll('polyline, path, polygon')];
        const points = Math.max(0, ...shapes.map(s => (s.getAttribute('points') || s.getAttribute('d') || '')
          .trim().split(/[\s,LM]+/).filter(Boolean).length / 2));
        const text = layer.textContent || '';
        return points >= 4 && { points: Math.floor(points), text: text.replace(/\s+/g, ' ').trim() };
      }, null, { polling: 200, timeout: 30000 }).then(h => h.jsonValue()).catch(() => null);
      out.srOutline = outline ?? { points: 0, text: '', timedOut: true };
      out.srOutline.screenshot = await shot(`${study.name}-sr`);
      lap(`${study.name}-sr`);
    } else {
      // 3. A normal phantom with its SEG loaded: lungs overlaid, no lesion, on slices across the chest.
      out.segments = await openSegmentation(study);
      out.images = await waitForViewport();
      out.samples = [];
      for (const fraction of [0.35, 0.5, 0.65]) {
        const index = Math.round((out.images - 1) * fraction);
        const rendered = await showImage(index, true);
        out.samples.push({ ...await waitForPixels(index, LUNGS_SHOWN, 30000), rendered });
      }
      out.screenshot = await shot(`${study.name}-seg`);
      lap(`${study.name}-seg`);
    }
  }
} catch (err) {
  results.errors.push(`${err.name}: ${err.message}`.slice(0, 2000));
  results.failureScreenshot = await shot('failure').catch(() => null);
  process.exitCode = 1;
} finally {
  await context.close();
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
fs.writeFileSync(path.join(plan.outDir, 'results.json'), JSON.stringify(results, null, 2));
console.log(JSON.stringify(results, null, 2));
