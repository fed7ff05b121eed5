#!/usr/bin/env node
// Drives OHIF 3 in Debian's headless Chromium (playwright-core, no browser download) and records
// what a reader would see: for each step a screenshot, the page's text, console messages, page
// errors and whether OHIF's error boundary fired. Written for the dicomai viewer tests.
//
// One job:   node ohif_driver.mjs --job job.json [--result result.json]
//            node ohif_driver.mjs --url URL --out DIR [--series DESC]... [--result result.json]
// Many jobs: node ohif_driver.mjs --serve   (one JSON job per stdin line, one JSON result per
//            stdout line; one browser for all, a fresh page per job)
//
// A job: {url, out_dir, name?, series?: [SeriesDescriptions, opened in turn (exact match of
//         the thumbnail's description first, else a substring)], study_timeout_ms?,
//         settle?: {quiet_ms, min_ms, max_ms}, error_details?: bool}
// A result: {ok (the driver got through; a series not found is a step's `found: false`),
//   all_found, error_boundary (any step), steps: [{name, series, found, screenshot, text_file,
//   body_text, thumbnails, viewports (boxes), error_boundary, error_reports, error_details,
//   console, page_errors, http_errors, settled, wait_ms}], console, page_errors, http_errors}.
// Each step waits until no request is pending, no progress bar shows and the screen is still
// for settle.quiet_ms (default 2 s; at most settle.max_ms, default 20 s).

import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { chromium } from 'playwright-core';

const CHROMIUM = process.env.DICOMAI_CHROMIUM || '/usr/bin/chromium';
const WIDTH = 1600;
const HEIGHT = 1000;
const ARGS = [
  '--no-sandbox',
  '--use-angle=swiftshader',
  '--enable-unsafe-swiftshader',
  '--ignore-gpu-blocklist',
  `--window-size=${WIDTH},${HEIGHT}`,
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--disable-quic',
];

const THUMBNAILS = '[data-cy="study-browser-thumbnail"], [data-cy="study-browser-thumbnail-no-image"]';
// OHIF's progress bars (study list, viewport loading indicator).
const SPINNERS = '.infinite-loading-bar, .loading';
const ERROR_TEXT = /Something went wrong|Sorry, something went wrong there/;

const DEFAULTS = {
  name: 'ohif',
  series: [],
  study_timeout_ms: 45000,
  settle: { quiet_ms: 2000, min_ms: 1500, max_ms: 20000 },
  error_details: true,
};

function parseArgs(argv) {
  const opts = { series: [] };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const next = () => argv[++i];
    if (a === '--job') opts.job = next();
    else if (a === '--result') opts.result = next();
    else if (a === '--serve') opts.serve = true;
    else if (a === '--url') opts.url = next();
    else if (a === '--out') opts.out_dir = next();
    else if (a === '--name') opts.name = next();
    else if (a === '--series') opts.series.push(next());
    else if (a === '--max-wait-ms') opts.max_ms = Number(next());
    else throw new Error(`unknown argument ${a}`);
  }
  return opts;
}

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));
const slug = s => s.replace(/[^A-Za-z0-9._-]+/g, '_').replace(/^_+|_+$/g, '').slice(0, 60) || 'x';

async function launch() {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'dicomai-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: ARGS,
    viewport: { width: WIDTH, height: HEIGHT },
    deviceScaleFactor: 1,
    locale: 'en-US',
    timezoneId: 'UTC',
  });
  return {
    context,
    async close() {
      await context.close().catch(() => {});
      fs.rmSync(profile, { recursive: true, force: true });
    },
  };
}

// Everything a job records, as the page runs.
function watch(page) {
  const log = { console: [], page_errors: [], http_errors: [], inflight: new Set(), step: 'open' };
  page.on('console', async msg => {
    const entry = { step: log.step, type: msg.type(), text: msg.text() };
    const loc = msg.location();
    if (loc && loc.url) entry.location = `${loc.url}:${loc.lineNumber}`;
    log.console.push(entry);
    // Error objects print as "JSHandle@error"; resolve their messages for errors and for
    // OHIF's error-boundary report.
    if (msg.type() === 'error' || /Error Boundary/.test(entry.text)) {
      try {
        const parts = await Promise.all(msg.args().map(h => h.evaluate(v =>
          v instanceof Error ? `${v.name}: ${v.message}\n${v.stack || ''}`
            : typeof v === 'object' ? (() => { try { return JSON.stringify(v); } catch { return String(v); } })()
              : String(v))));
        entry.args = parts;
      } catch { /* page gone */ }
    }
  });
  page.on('pageerror', err => {
    log.page_errors.push({ step: log.step, message: String(err && err.message || err),
      stack: String(err && err.stack || '') });
  });
  page.on('request', req => log.inflight.add(req));
  const done = req => log.inflight.delete(req);
  page.on('requestfinished', done);
  page.on('requestfailed', req => {
    done(req);
    const failure = req.failure();
    log.http_errors.push({ step: log.step, url: req.url(), status: null,
      error: failure ? failure.errorText : 'failed' });
  });
  page.on('response', resp => {
    if (resp.status() >= 400) {
      log.http_errors.push({ step: log.step, url: resp.url(), status: resp.status() });
    }
  });
  return log;
}

async function visible(page, selector) {
  return page.evaluate(sel => [...document.querySelectorAll(sel)].some(el => {
    const r = el.getBoundingClientRect();
    const s = getComputedStyle(el);
    return r.width > 0 && r.height > 0 && s.visibility !== 'hidden' && s.display !== 'none';
  }), selector).catch(() => false);
}

// Close the first-visit tour and the investigational-use notice when they are up, and answer
// the viewport prompts a step accepts (e.g. "Yes" to "Do you want to open this Segmentation?").
async function dismissOverlays(page, accept = []) {
  const dismissed = [];
  for (const label of ['Skip all', 'Confirm and hide', ...accept]) {
    const button = page.getByRole('button', { name: label, exact: true });
    try {
      if (await button.count() > 0 && await button.first().isVisible()) {
        await button.first().click({ timeout: 3000 });
        dismissed.push(label);
      }
    } catch { /* gone meanwhile */ }
  }
  return dismissed;
}

// A cheap fingerprint of what is on screen (decoding and drawing happen off the network).
async function screenHash(page) {
  try {
    const shot = await page.screenshot({ type: 'jpeg', quality: 40, timeout: 5000 });
    return crypto.createHash('sha1').update(shot).digest('hex');
  } catch {
    return null;
  }
}

// Wait until no request is pending, no progress bar shows and the screen has not changed for
// quiet_ms (at least min_ms, at most max_ms), dismissing overlays on the way.
async function settle(page, log, settle, accept = []) {
  const start = Date.now();
  let quietSince = null;
  let lastHash = null;
  const dismissed = [];
  while (true) {
    dismissed.push(...await dismissOverlays(page, accept));
    const hash = await screenHash(page);
    const changed = hash === null || hash !== lastHash;
    lastHash = hash;
    const busy = changed || log.inflight.size > 0 || await visible(page, SPINNERS);
    const now = Date.now();
    if (busy) quietSince = null;
    else if (quietSince === null) quietSince = now;
    const elapsed = now - start;
    if (quietSince !== null && now - quietSince >= settle.quiet_ms && elapsed >= settle.min_ms) {
      return { settled: true, wait_ms: elapsed, dismissed };
    }
    if (elapsed >= settle.max_ms) {
      return { settled: false, wait_ms: elapsed, dismissed,
        pending: [...log.inflight].slice(0, 10).map(r => r.url()) };
    }
    await sleep(300);
  }
}

// The thumbnail whose SeriesDescription is `desc`; failing that, the first that contains it.
async function findThumbnail(page, desc) {
  const all = page.locator(THUMBNAILS);
  const exact = all.filter({ has: page.locator('[data-cy="series-description-label"]',
    { hasText: new RegExp(`^\\s*${desc.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}\\s*$`) }) });
  if (await exact.count() > 0) return exact.first();
  return all.filter({ hasText: desc }).first();
}

async function snapshot(page) {
  return page.evaluate(([thumbSel, errRe]) => {
    const box = el => { const r = el.getBoundingClientRect();
      return { x: r.x, y: r.y, width: r.width, height: r.height }; };
    const text = document.body ? document.body.innerText : '';
    return {
      body_text: text,
      error_boundary: new RegExp(errRe).test(text)
        || !!document.querySelector('.ErrorFallback, [role="alert"] .ErrorFallback'),
      thumbnails: [...document.querySelectorAll(thumbSel)].map(el => ({
        text: el.innerText, type: el.getAttribute('data-cy'), box: box(el),
        active: el.className.includes('active') || undefined })),
      viewports: [...document.querySelectorAll('[data-cy="viewport-pane"]')].map(el => ({
        box: box(el), text: el.innerText, canvases: el.querySelectorAll('canvas').length })),
      title: document.title,
    };
  }, [THUMBNAILS, ERROR_TEXT.source]);
}

// Open OHIF's error details ("Show Details") to read the message, then close them again.
async function errorDetails(page, file) {
  const button = page.getByRole('button', { name: 'Show Details' });
  try {
    if (await button.count() === 0) return null;
    await button.first().click({ timeout: 3000 });
    const dialog = page.getByRole('dialog');
    await dialog.first().waitFor({ timeout: 5000 });
    const text = await dialog.first().innerText();
    await page.screenshot({ path: file });
    // Close it again so that the next step can click (Escape alone leaves it up).
    const close = dialog.first().getByRole('button', { name: 'Close' });
    if (await close.count() > 0) await close.last().click({ timeout: 3000 });
    else await page.keyboard.press('Escape');
    await dialog.first().waitFor({ state: 'hidden', timeout: 5000 }).catch(() => {});
    return { text, screenshot: file };
  } catch (e) {
    return { text: null, failure: String(e) };
  }
}

async function record(page, log, job, index, label, extra) {
  const base = path.join(job.out_dir, `${String(index).padStart(2, '0')}-${slug(label)}`);
  const screenshot = `${base}.png`;
  await page.screenshot({ path: screenshot });
  const snap = await snapshot(page);
  fs.writeFileSync(`${base}.txt`, snap.body_text);
  const step = { index, name: label, screenshot, text_file: `${base}.txt`, ...extra, ...snap };
  if (snap.error_boundary && job.error_details) {
    step.error_details = await errorDetails(page, `${base}-error-details.png`);
  }
  step.console = log.console.filter(c => c.step === label);
  // OHIF's error boundary reports what it caught on console.debug ("<context> Error Boundary").
  step.error_reports = step.console.filter(c => /Error Boundary/.test(c.text))
    .map(c => c.text.split('\n')[0]);
  if (step.error_reports.length) step.error_boundary = true;
  step.page_errors = log.page_errors.filter(e => e.step === label);
  step.http_errors = log.http_errors.filter(e => e.step === label);
  return step;
}

async function runJob(context, rawJob) {
  const job = { ...DEFAULTS, ...rawJob, settle: { ...DEFAULTS.settle, ...(rawJob.settle || {}) } };
  if (!job.url || !job.out_dir) throw new Error('a job needs url and out_dir');
  fs.mkdirSync(job.out_dir, { recursive: true });
  const started = Date.now();
  const result = { name: job.name, url: job.url, out_dir: job.out_dir, steps: [], ok: true };
  const page = await context.newPage();
  const log = watch(page);
  try {
    log.step = 'study';
    await page.goto(job.url, { waitUntil: 'domcontentloaded', timeout: job.study_timeout_ms });
    // The study is in when its thumbnails (or an error, or "no study") are on screen.
    const appeared = await page.waitForFunction(([thumbSel, errRe]) =>
      document.querySelector(thumbSel) || new RegExp(errRe).test(document.body.innerText)
        || document.querySelector('[data-cy="study-not-found-message"]'),
    [THUMBNAILS, ERROR_TEXT.source], { timeout: job.study_timeout_ms, polling: 250 })
      .then(() => true, () => false);
    const openedMs = Date.now() - started;
    const s = await settle(page, log, job.settle);
    const first = await record(page, log, job, 0, 'study',
      { series: null, appeared, study_ms: openedMs, ...s });
    first.found = first.thumbnails.length > 0;
    result.steps.push(first);
    for (const [i, desc] of job.series.entries()) {
      const label = `series-${slug(desc)}`;
      log.step = label;
      const t0 = Date.now();
      await dismissOverlays(page);
      const thumb = await findThumbnail(page, desc);
      let found = false;
      try {
        await thumb.waitFor({ state: 'visible', timeout: 5000 });
        await thumb.scrollIntoViewIfNeeded({ timeout: 3000 });
        await thumb.dblclick({ timeout: 5000 });
        found = true;
      } catch (e) {
        result.steps.push(await record(page, log, job, i + 1, label, { series: desc, found,
          failure: `no thumbnail with "${desc}" could be double-clicked: ${e.message.split('\n')[0]}` }));
        continue;
      }
      const s2 = await settle(page, log, job.settle, job.accept || []);
      result.steps.push(await record(page, log, job, i + 1, label,
        { series: desc, found, click_ms: Date.now() - t0, ...s2 }));
    }
  } catch (e) {
    result.ok = false;
    result.failure = String(e && e.stack || e);
    try {
      const shot = path.join(job.out_dir, 'failure.png');
      await page.screenshot({ path: shot });
      result.failure_screenshot = shot;
    } catch { /* page gone */ }
  } finally {
    result.console = log.console;
    result.page_errors = log.page_errors;
    result.http_errors = log.http_errors;
    result.error_boundary = result.steps.some(s => s.error_boundary);
    result.all_found = result.steps.length === job.series.length + 1
      && result.steps.every(s => s.found);
    result.elapsed_ms = Date.now() - started;
    await page.close().catch(() => {});
  }
  fs.writeFileSync(path.join(job.out_dir, 'result.json'), JSON.stringify(result, null, 2));
  return result;
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const browser = await launch();
  try {
    if (opts.serve) {
      const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
      process.stdout.write(JSON.stringify({ ready: true, chromium: CHROMIUM,
        version: browser.context.browser()?.version() ?? null }) + '\n');
      for await (const line of rl) {
        if (!line.trim()) continue;
        let out;
        try { out = await runJob(browser.context, JSON.parse(line)); }
        catch (e) { out = { ok: false, failure: String(e && e.stack || e) }; }
        process.stdout.write(JSON.stringify(out) + '\n');
      }
      return;
    }
    const job = opts.job ? JSON.parse(fs.readFileSync(opts.job, 'utf8')) : {};
    for (const key of ['url', 'out_dir', 'name']) if (opts[key]) job[key] = opts[key];
    if (opts.series.length) job.series = opts.series;
    if (opts.max_ms) job.settle = { ...(job.settle || {}), max_ms: opts.max_ms };
    const result = await runJob(browser.context, job);
    const text = JSON.stringify(result, null, 2);
    if (opts.result) fs.writeFileSync(opts.result, text);
    else process.stdout.write(text + '\n');
    process.exitCode = result.ok ? 0 : 1;
  } finally {
    await browser.close();
  }
}

main().catch(e => { console.error(e && e.stack || e); process.exit(2); });
