// Tally cache-tests results by kind (required / optimal / check), beside the suite's own
// published results for other caches.  Usage: node score.mjs SUITE_DIR RESULT.json...
import fs from 'fs'
import path from 'path'
import { pathToFileURL } from 'url'

const [suiteDir, ...files] = process.argv.slice(2)
const { default: tests } = await import(pathToFileURL(path.join(suiteDir, 'tests', 'index.mjs')))
const kinds = {}
for (const suite of tests) for (const t of suite.tests) kinds[t.id] = t.kind || 'required'
const verbose = process.env.SHOW_FAILURES === '1'
for (const file of files) {
  const results = JSON.parse(fs.readFileSync(file))
  const tally = {}
  const failed = []
  for (const [id, kind] of Object.entries(kinds)) {
    tally[kind] = tally[kind] || { pass: 0, total: 0 }
    tally[kind].total++
    if (results[id] === true) tally[kind].pass++
    else if (kind === 'required') failed.push(`${id}: ${JSON.stringify(results[id])}`)
  }
  const row = ['required', 'optimal', 'check'].map(k => `${k} ${tally[k].pass}/${tally[k].total}`)
  console.log(`${path.basename(file, '.json').padEnd(16)} ${row.join('  ')}`)
  if (verbose && file === files[0]) for (const line of failed) console.log(`    fails: ${line}`)
}
