// Drives a real VS Code (code-server) in headless Chromium, as a person would: for each step, open a
// file, wait until codellm-serve has its model, type at the end of the file, wait for ghost text,
// accept it with Tab and save. The test reads the saved files; this script only acts, and leaves a
// screenshot after every step (and at the point of failure).
//
//   node drive.js PLAN.json
//
// PLAN: { url, chromium, serverLog, userSettings, shots, steps: [{ file, text, settings?, waitLog?, rests? }] }
// `settings` (optional) are changed in the settings.json editor before the step; `waitLog` is a line
// the server's log must then contain (counted afresh from that point) before typing. `rests`: before
// typing, the cursor is moved to the end of the file and then to its start, each time left there until
// the server logs that the cursor rests (so the prompt the typing reads is not the one a rest read).
"use strict";
const fs = require("node:fs");
const path = require("node:path");
const { chromium } = require("playwright-core");

const plan = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const GHOST = '.monaco-editor [class*="ghost-text"]';

function log(message) {
  process.stdout.write(`[drive ${new Date().toISOString().slice(11, 23)}] ${message}\n`);
}

async function until(what, predicate, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await predicate();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs / 1000} s waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

function serverLog() {
  try {
    return fs.readFileSync(plan.serverLog, "utf8");
  } catch {
    return "";
  }
}

function count(text, needle) {
  return text.split(needle).length - 1;
}

async function openFile(page, name) {
  await page.keyboard.press("Control+P");
  const input = page.locator(".quick-input-widget input");
  await input.waitFor({ state: "visible", timeout: 20000 });
  await input.fill(name);
  const row = page.locator(`.quick-input-list .monaco-list-row[aria-label*="${name}"]`).first();
  await row.waitFor({ state: "visible", timeout: 20000 });
  await row.click();
  await page.locator(`.tab.active[aria-label*="${name}"]`).waitFor({ timeout: 20000 });
  await page.locator(".monaco-editor.focused").waitFor({ timeout: 20000 });
}

async function command(page, title) {
  await page.keyboard.press("F1");
  const input = page.locator(".quick-input-widget input");
  await input.waitFor({ state: "visible", timeout: 20000 });
  await input.fill(`>${title}`);
  const row = page.locator(`.quick-input-list .monaco-list-row[aria-label*="${title}"]`).first();
  await row.waitFor({ state: "visible", timeout: 20000 });
  await row.click();
}

// as a user would: the settings.json editor, edited and saved in VS Code
async function changeSettings(page, changes) {
  const before = fs.readFileSync(plan.userSettings, "utf8");
  const settings = { ...JSON.parse(before), ...changes };
  await command(page, "Preferences: Open User Settings (JSON)");
  // in a tab (workbench.editor.useModal is off)
  await page.locator('.tab.active[aria-label*="settings.json"]').waitFor({ timeout: 20000 });
  await page.locator(".monaco-editor.focused .view-lines", { hasText: "codellm.serverCommand" })
    .waitFor({ timeout: 20000 });
  await page.keyboard.press("Control+A");
  const want = JSON.stringify(settings);
  await page.keyboard.insertText(want);
  // saved once the file holds all of it (a save can land before the editor has taken the whole edit)
  let saves = 0;
  await until("settings.json to be saved", async () => {
    if (fs.readFileSync(plan.userSettings, "utf8") === want) return true;
    if (saves++ % 20 === 0) await page.keyboard.press("Control+S");
    return false;
  }, 20000);
  await page.locator(".tab.active.dirty").waitFor({ state: "detached", timeout: 20000 });
  log(`settings changed in the editor: ${JSON.stringify(changes)}`);
}

async function step(page, s, index) {
  const file = path.join(plan.workspace, s.file);
  const before = fs.readFileSync(file, "utf8");
  // text typed before the server has its model, or before the editor has finished starting it, gets
  // no suggestion until the next edit
  const needles = s.waitLog ? [s.waitLog] : ["model loaded from", "editor initialized"];
  const seen = needles.map((needle) => count(serverLog(), needle));
  if (s.settings) await changeSettings(page, s.settings);
  await openFile(page, s.file);
  log(`opened ${s.file}`);
  await until(`${needles.join(" and ")} in the server log`,
    () => needles.every((needle, i) => count(serverLog(), needle) > seen[i]), 60000);
  log(`server ready (${needles.join(", ")})`);
  if (s.rests) {
    const last = before.split("\n").length;
    for (const [key, line] of [["Control+End", last], ["Control+Home", 1]]) {
      const needle = `cursor rests at line ${line},`;
      const seen = count(serverLog(), needle);
      await page.keyboard.press(key);
      await until(`the server to log "${needle}" after ${key}`, () => count(serverLog(), needle) > seen, 20000);
      log(`server told: ${needle}`);
    }
  }
  await page.keyboard.press("Control+End");
  // one edit, so the editor asks once, at the final position
  await page.keyboard.insertText(s.text);
  for (let attempt = 1; ; attempt++) {
    try {
      await page.locator(GHOST).first().waitFor({ state: "visible", timeout: 20000 });
      break;
    } catch (error) {
      if (attempt === 3) throw error;
      // the editor may have registered the server's provider just after the edit: edit again, ending
      // at the same place (a character typed and deleted, so nothing is served as typed ahead)
      log("no ghost text yet; typing a character and deleting it");
      await page.keyboard.insertText("x");
      await page.keyboard.press("Backspace");
    }
  }
  const ghost = await page.locator(GHOST).allTextContents();
  log(`ghost text shown: ${JSON.stringify(ghost.join("⏎"))}`);
  await page.keyboard.press("Tab");
  // taken: that ghost text is gone, though the editor may already show the next suggestion after it
  await until("the suggestion to be taken", async () =>
    JSON.stringify(await page.locator(GHOST).allTextContents()) !== JSON.stringify(ghost), 20000);
  await page.keyboard.press("Control+S");
  await until(`${s.file} to be saved`, () => fs.readFileSync(file, "utf8") !== before, 20000);
  await page.locator(".tab.active.dirty").waitFor({ state: "detached", timeout: 20000 });
  log(`saved ${s.file}`);
  await page.screenshot({ path: path.join(plan.shots, `step${index + 1}.png`) });
}

async function main() {
  const browser = await chromium.launch({
    executablePath: plan.chromium,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
  });
  let page;
  try {
    page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
    await page.goto(plan.url, { timeout: 60000 });
    await page.locator(".monaco-workbench").waitFor({ timeout: 60000 });
    await page.locator(".explorer-folders-view, .monaco-workbench .part.sidebar").first()
      .waitFor({ timeout: 60000 });
    log("workbench up");
    for (const [index, s] of plan.steps.entries()) await step(page, s, index);
  } catch (error) {
    const shot = path.join(plan.shots, "failure.png");
    if (page) await page.screenshot({ path: shot }).catch(() => {});
    log(`FAILED: ${error.message} (screenshot: ${shot})`);
    process.exitCode = 1;
  } finally {
    await browser.close();
  }
}

main();
