#!/usr/bin/env node
// Generates the Unicode range tables used by data/tokenizer.h from node's own
// regular-expression engine, so the C pre-tokeniser classifies code points
// exactly like the reference encoder (gpt-3-encoder), whose pattern uses
// \p{L}, \p{N} and \s with the /u flag.
//
//   node data/gen_unicode_tables.js                 print the generated block
//   node data/gen_unicode_tables.js --update FILE   rewrite the block in FILE
//   node data/gen_unicode_tables.js --check FILE    exit 1 if FILE's block differs
'use strict';
const fs = require('fs');

const BEGIN = '/* BEGIN GENERATED UNICODE TABLES';
const END = '/* END GENERATED UNICODE TABLES */';

// Inclusive [lo, hi] ranges of the code points that match `re`.
function ranges(re) {
  const out = [];
  let start = -1;
  for (let cp = 0; cp <= 0x110000; cp++) {
    const isSurrogate = cp >= 0xd800 && cp <= 0xdfff;
    const hit = cp < 0x110000 && !isSurrogate && re.test(String.fromCodePoint(cp));
    if (hit && start < 0) start = cp;
    if (!hit && start >= 0) { out.push([start, cp - 1]); start = -1; }
  }
  return out;
}

function table(name, rs) {
  const hex = (x) => '0x' + x.toString(16).toUpperCase();
  const cells = rs.map(([lo, hi]) => `{${hex(lo)},${hex(hi)}}`);
  const lines = [];
  for (let i = 0; i < cells.length; i += 6) lines.push('    ' + cells.slice(i, i + 6).join(','));
  return `static const uint32_t ${name}[${rs.length}][2] = {\n${lines.join(',\n')}\n};\n`;
}

function generate() {
  return `${BEGIN} (Unicode ${process.versions.unicode}):\n` +
    '   node data/gen_unicode_tables.js --update data/tokenizer.h */\n' +
    table('bpe__letter_ranges', ranges(/^\p{L}$/u)) +
    table('bpe__number_ranges', ranges(/^\p{N}$/u)) +
    table('bpe__space_ranges', ranges(/^\s$/u)) +
    END;
}

// Returns [before, block, after] of a file's text, or null if it has no block.
function splitBlock(text) {
  const a = text.indexOf(BEGIN), b = text.indexOf(END);
  if (a < 0 || b < a) return null;
  return [text.slice(0, a), text.slice(a, b + END.length), text.slice(b + END.length)];
}

function main(argv) {
  const [mode, file] = argv;
  if (mode === undefined) { process.stdout.write(generate() + '\n'); return 0; }
  if ((mode !== '--update' && mode !== '--check') || !file) {
    console.error('usage: node gen_unicode_tables.js [--update FILE | --check FILE]');
    return 2;
  }
  const text = fs.readFileSync(file, 'utf8');
  const parts = splitBlock(text);
  if (!parts) { console.error(`error: ${file}: no generated-table block found`); return 1; }
  const fresh = generate();
  if (mode === '--check') {
    if (parts[1] === fresh) { console.log(`${file}: Unicode tables match node (Unicode ${process.versions.unicode})`); return 0; }
    console.error(`error: ${file}: Unicode tables differ from this node's (Unicode ${process.versions.unicode}); ` +
                  'run node data/gen_unicode_tables.js --update data/tokenizer.h');
    return 1;
  }
  fs.writeFileSync(file, parts[0] + fresh + parts[2]);
  return 0;
}

module.exports = { generate, splitBlock, ranges };
if (require.main === module) process.exitCode = main(process.argv.slice(2));
