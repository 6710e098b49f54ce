#!/usr/bin/env node
// Compares data/prepare's C tokenizer with the reference JS encoder of the npm
// package gpt-3-encoder, token by token:
//   - every corpus document (one file each, as prepare shards reads them),
//   - a Unicode stress text (accents, CJK, emoji, other scripts' digits,
//     whitespace runs, CRLF, tabs, ...),
//   - a sweep over Unicode: both sides of every letter/number/space range
//     edge plus every --sweep-stride'th scalar value (default 251; 1 = all),
//   - the Unicode range tables in tokenizer.h against this node's regex engine.
// Each group of texts also has to decode back to its exact bytes (prepare decode).
//
// usage: node check_tokenizer.js --encoder-dir DIR --prepare BIN --tokenizer FILE.tok
//                                --work DIR [--sweep-stride N] [DOC ...]
'use strict';
const fs = require('fs');
const os = require('os');
const path = require('path');
const { execFileSync } = require('child_process');
const { Worker, isMainThread, parentPort, workerData } = require('worker_threads');

// ---- worker thread: run the reference encoder (it is slow, so use all cores)
function workerMain() {
  const { encode } = require(workerData.encoderDir);
  parentPort.on('message', (file) => {
    parentPort.postMessage({ file, ids: encode(fs.readFileSync(file, 'utf8')) });
  });
}

// ---- test texts
function stressText() {
  const parts = [
    '\uFEFFBOM first. ',                                       // U+FEFF is \s in JS
    "Contractions: it's I'm you're we've they'll he'd don't CAN'T 'S 'quoted' ''s rock'n'roll O'Neil's\n",
    'Whitespace:  two   three\t\ttabs \r\nCRLF\r\n\r\nblank\n\n\nlines   \n  indented \u00A0nbsp\u3000ideo' +
      '\u2028ls\u2029ps\u202Fnnbsp\u205Fmmsp\u1680ogham\u2000\u200Aen\u200Bzwsp\u180Emvs\u0085nel' +
      '\x0Bvt\x0Cff\x1Cfs\x1Dgs\x1Ers\x1Fus\x00nul \t \n\t\n  \n',
    'Accents: café naïve résumé Ångström façade Žluťoučký kůň jalapeño; decomposed: cafe\u0301 nai\u0308ve\n',
    'Greek/Cyrillic: Ελληνικά Ωμέγα Русский язык Ёжик; Armenian Հայերեն; Georgian ქართული\n',
    'CJK: 中文字符测试，日本語のテキスト。カタカナ ﾊﾝｶｸ 한국어 텍스트 𠀋𡈽𡌛 (ext-B)\n',
    'Emoji: 👍🏽 👨‍👩‍👧‍👦 🇺🇸🇫🇷 ❤️ 😀😃😄 🧑🏿‍💻 ☃ ★ ✓ ©®™ … ‰ ← → ∑∫√∞ ≠≤≥\n',
    'Digits: 0123456789 ٠١٢٣٤٥٦٧٨٩ ۱۲۳ ०१२३४ ০১২ ๑๒๓ ０１２３ ⅠⅡⅢⅫ ↉ ½¼¾ ²³¹ ①②⑳ 𝟘𝟙𝟚 ᛮᛯ 〇〡 𐌠\n',
    'Numbers: 1,234,567.89 3.14e-10 -42 +7 $100 50% 2nd 1st 10x 0xDEADBEEF 1e9 ٣٫١٤ abc123def ABC_def\n',
    'Scripts: مرحبا بالعالم שָׁלוֹם עולם ภาษาไทย हिन्दी भाषा বাংলা தமிழ் አማርኛ ᏣᎳᎩ ꦗꦮ 𝐀𝐁𝐂 𝔘𝔫𝔦 ℕℤℚ ſt ﬁ\n',
    'Marks and format: e\u0301\u0302\u0303 a\u200Db x\u2060y \u00AD soft\u00ADhyphen \uFE0F\uFE0E \uE000\uF8FF private ' +
      '\uFFFD\uFFFC \uFFFF\uFFFE nonchar \u0378 unassigned \u{10FFFF} \u{E0041}tag\n',
    'Code: if (x != y) { return a->b[i] + 0x1F; } // comment\n\tprintf("%d\\n", n);\n    def f(x):\n        return x**2\n',
    'Punctuation runs: !!! ??? ... --- *** ### @@@ ~~~ ``` """ \'\'\' ,,, ;;; ::: ((( ))) [[[ ]]] {{{ }}} <<< >>> ||| &&&\n',
    'Specials: <|endoftext|> <|im_start|> [CLS] </s>\n',
    'Long: ' + 'a'.repeat(300) + ' ' + 'ab'.repeat(200) + ' ' + '9'.repeat(300) + ' ' + '!'.repeat(300) + ' ' +
      'Ünïcödé'.repeat(50) + ' ' + '日本'.repeat(150) + '\n',
    ' '.repeat(200) + 'x' + '\t'.repeat(50) + '\n'.repeat(50) + '\r\n'.repeat(20) + 'y',
    '\n end with spaces   ',
  ];
  // Characters whose class is easy to get wrong, each in several contexts.
  const tricky = [...'\x00\x08\x1C\x1D\x1E\x1F\x7F\x85\xA0\xAD\u180E\u200B\u200D\u2060\uFEFF\u1680\u2000' +
                  '\u200A\u2028\u2029\u202F\u205F\u3000\u0301\uFE0F\'\u2019\t\r\n\x0B\x0C'];
  for (const c of tricky) parts.push(`a${c}b ${c}x ${c}${c}y 1${c}2 . ${c} ${c}  ${c}\n`);
  return parts.join('');
}

// Code points for the sweep: both sides of every edge of the \p{L}, \p{N}
// and \s ranges (where the class changes), the UTF-8 length and surrogate
// boundaries, and every stride'th scalar value (stride 1: all of Unicode).
function sweepCodePoints(gen, stride) {
  const set = new Set([0x7FF, 0x800, 0xD7FF, 0xE000, 0xFFFF, 0x10000, 0x10FFFF]);
  for (let cp = 0; cp < 0x100; cp++) set.add(cp); // all of ASCII and Latin-1
  for (const re of [/^\p{L}$/u, /^\p{N}$/u, /^\s$/u])
    for (const [lo, hi] of gen.ranges(re)) for (const cp of [lo - 1, lo, hi, hi + 1]) set.add(cp);
  for (let cp = 0; cp <= 0x10FFFF; cp += stride) set.add(cp);
  return [...set].filter((cp) => cp >= 0 && cp <= 0x10FFFF && !(cp >= 0xD800 && cp <= 0xDFFF))
                 .sort((x, y) => x - y);
}

// Each code point next to a letter, a digit, a space and its neighbours; 256
// per text, because the reference encoder is quadratic in a text's length.
function sweepTexts(cps) {
  const texts = [];
  for (let i = 0; i < cps.length; i += 256) {
    texts.push(cps.slice(i, i + 256).map((cp) => {
      const c = String.fromCodePoint(cp);
      return c + 'a' + c + '1 ' + c;
    }).join(''));
  }
  return texts;
}

// ---- comparison
function runPrepare(bin, args) {
  return execFileSync(bin, args, { maxBuffer: 1 << 30, stdio: ['ignore', 'pipe', 'inherit'] });
}

function parseIds(out) {
  const s = out.toString().trim();
  return s === '' ? [] : s.split(' ').map(Number);
}

// prepare encode, many inputs per call (one output line each).
function encodeWithPrepare(args, files) {
  const out = new Map();
  for (let i = 0; i < files.length; i += 200) {
    const batch = files.slice(i, i + 200);
    const lines = runPrepare(args.prepare, ['encode', '--tokenizer', args.tokenizer,
      ...batch.flatMap((f) => ['--input', f])]).toString().split('\n');
    if (lines.length !== batch.length + 1) throw new Error(`prepare encode printed ${lines.length - 1} lines for ${batch.length} inputs`);
    batch.forEach((f, k) => out.set(f, lines[k] === '' ? [] : lines[k].split(' ').map(Number)));
  }
  return out;
}

// prepare decode of all the files' ids at once must give back their bytes.
function roundTrips(args, files, ids) {
  const idsFile = path.join(args.work, 'check_ids.tmp');
  fs.writeFileSync(idsFile, files.map((f) => ids.get(f).join(' ')).join('\n') + '\n');
  const back = runPrepare(args.prepare, ['decode', '--tokenizer', args.tokenizer, '--input', idsFile]);
  fs.rmSync(idsFile, { force: true });
  return back.equals(Buffer.concat(files.map((f) => fs.readFileSync(f))));
}

// Returns null if equal, else a one-line description of the first difference.
function compare(file, ref, mine, refDecode) {
  if (ref.length === mine.length && ref.every((x, i) => x === mine[i])) return null;
  let i = 0;
  while (i < ref.length && i < mine.length && ref[i] === mine[i]) i++;
  const ctx = (a) => JSON.stringify(a.slice(Math.max(0, i - 3), i + 4));
  const text = JSON.stringify(refDecode(ref.slice(Math.max(0, i - 3), i + 4)));
  return `${path.basename(file)}: ${ref.length} vs ${mine.length} tokens, first difference at ${i}: ` +
         `reference ${ctx(ref)} prepare ${ctx(mine)} near ${text}`;
}

function parseArgs(argv) {
  const a = { docs: [], sweepStride: 251 };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i];
    const next = () => { if (i + 1 >= argv.length) throw new Error(`${k} needs a value`); return argv[++i]; };
    if (k === '--encoder-dir') a.encoderDir = path.resolve(next());
    else if (k === '--prepare') a.prepare = path.resolve(next());
    else if (k === '--tokenizer') a.tokenizer = next();
    else if (k === '--work') a.work = next();
    else if (k === '--sweep-stride') a.sweepStride = parseInt(next(), 10);
    else if (k.startsWith('--')) throw new Error(`unknown option ${k}`);
    else a.docs.push(k);
  }
  if (!a.encoderDir || !a.prepare || !a.tokenizer || !a.work || !(a.sweepStride >= 1))
    throw new Error('usage: check_tokenizer.js --encoder-dir DIR --prepare BIN --tokenizer FILE.tok --work DIR [--sweep-stride N] [DOC ...]');
  return a;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const t0 = Date.now();
  const { decode } = require(args.encoderDir);
  let passed = 0, failed = 0;
  const fail = (msg) => { failed++; console.log('FAIL ' + msg); };

  // 1. the generated Unicode tables are this node's \p{L}, \p{N}, \s
  const gen = require('./gen_unicode_tables.js');
  const header = fs.readFileSync(path.join(__dirname, 'tokenizer.h'), 'utf8');
  const block = gen.splitBlock(header);
  if (block && block[1] === gen.generate()) passed++;
  else fail(`tokenizer.h: Unicode tables differ from node's (Unicode ${process.versions.unicode})`);

  // 2. the texts: corpus documents, the stress text, the sweep
  fs.mkdirSync(args.work, { recursive: true });
  for (const f of fs.readdirSync(args.work)) if (/^unicode_.*\.txt$/.test(f)) fs.rmSync(path.join(args.work, f));
  const groups = { corpus: args.docs, stress: [path.join(args.work, 'unicode_stress.txt')], sweep: [] };
  fs.writeFileSync(groups.stress[0], stressText());
  const sweepCps = sweepCodePoints(gen, args.sweepStride);
  sweepTexts(sweepCps).forEach((t, k) => {
    const f = path.join(args.work, `unicode_sweep_${String(k).padStart(4, '0')}.txt`);
    fs.writeFileSync(f, t);
    groups.sweep.push(f);
  });
  const files = [...groups.corpus, ...groups.stress, ...groups.sweep];
  const kindOf = new Map();
  for (const [kind, fs_] of Object.entries(groups)) for (const f of fs_) kindOf.set(f, kind);
  const kinds = { corpus: [0, 0], stress: [0, 0], sweep: [0, 0] }; // [documents, tokens]

  // 3. prepare's ids (fast), then the reference's from worker threads
  const mine = encodeWithPrepare(args, files);
  const check = ({ file, ids: ref }) => {
    const k = kinds[kindOf.get(file)];
    k[0]++; k[1] += ref.length;
    const diff = compare(file, ref, mine.get(file), decode);
    if (diff) fail(diff); else passed++;
  };
  const nWorkers = Math.max(1, Math.min(files.length, (os.availableParallelism ? os.availableParallelism() : os.cpus().length)));
  const queue = files.slice();
  await Promise.all(Array.from({ length: nWorkers }, () => new Promise((resolve, reject) => {
    const w = new Worker(__filename, { workerData: { encoderDir: args.encoderDir } });
    const feed = () => (queue.length ? w.postMessage(queue.shift()) : w.terminate().then(resolve));
    w.on('message', (msg) => { try { check(msg); } catch (e) { reject(e); return; } feed(); });
    w.on('error', reject);
    feed();
  })));

  // 4. lossless: decode(encode(text)) == text, per group
  for (const [kind, fs_] of Object.entries(groups)) {
    if (fs_.length === 0) continue;
    if (roundTrips(args, fs_, mine)) passed++; else fail(`${kind}: decode(encode(text)) != text`);
  }

  for (const [kind, [docs, toks]] of Object.entries(kinds))
    console.log(`${kind}: ${docs} documents, ${toks} reference tokens compared`);
  console.log(`sweep: ${sweepCps.length} code points (stride ${args.sweepStride} plus every class edge)`);
  console.log(`compared ${kinds.corpus[1] + kinds.stress[1] + kinds.sweep[1]} tokens in total; checks: ` +
              `1 Unicode-table + ${files.length} documents + ${Object.values(groups).filter((g) => g.length).length} round trips`);
  console.log(`took ${((Date.now() - t0) / 1000).toFixed(1)} s (${nWorkers} reference-encoder threads)`);
  console.log(`${passed} passed, ${failed} failed`);
  return failed === 0 ? 0 : 1;
}

if (isMainThread) {
  main().then((rc) => { process.exitCode = rc; }, (e) => { console.error('error: ' + e.message); process.exitCode = 2; });
} else {
  workerMain();
}
