// The http-cache-tests runner of bin/conformance, copied by it into a copy
// of the suite (so that the relative imports below are the suite's own).
//
//   node conformance-runner.mjs BASE_URL VARIANT_DIR OUT.json
//
// Runs every test of the suite (as its cli.mjs does, Surrogate-Control
// included) against BASE_URL (no trailing slash), plus "ID (max-age)": each
// test that differs in VARIANT_DIR, a second copy of the suite whose
// templates give freshness by Cache-Control: max-age instead of Expires.
// Writes [{id, name, suite, kind, outcome, detail}] to OUT.json, outcome
// being the suite's own verdict (lib/display.mjs's determineTestResult):
// pass, fail, optional_fail, yes, no, setup_fail, harness_fail,
// dependency_fail, retry or untested.
import fs from 'fs'
import path from 'path'
import { pathToFileURL } from 'url'
import fetch from 'node-fetch'
import { runTests, getResults } from './client/runner.mjs'
import { determineTestResult } from './lib/display.mjs'
import suites from './tests/index.mjs'
import surrogate from './tests/surrogate-control.mjs'

const [base, variantDir, outFile] = process.argv.slice(2)
if (!outFile || base.endsWith('/')) {
  console.error('usage: conformance-runner.mjs BASE_URL(no trailing /) VARIANT_DIR OUT.json')
  process.exit(2)
}
const load = async file => (await import(pathToFileURL(path.join(variantDir, file)))).default
const variantSuites = [...await load('tests/index.mjs'), await load('tests/surrogate-control.mjs')]
suites.push(surrogate)

const SUFFIX = ' (max-age)'
// Compared before anything runs: the runner adds fields to the tests.
const variants = []
suites.forEach((suite, i) => {
  suite.tests.forEach((test, j) => {
    const other = variantSuites[i].tests[j]
    if (other.id !== test.id) throw new Error(`the variant copy differs: ${other.id} vs ${test.id}`)
    if (JSON.stringify(other) !== JSON.stringify(test)) variants.push([suite, other])
  })
})
const variantIds = new Set(variants.map(([, t]) => t.id))
for (const [suite, test] of variants) {
  test.id += SUFFIX
  test.name += ' (freshness by `Cache-Control: max-age` instead of `Expires`)'
  if (test.depends_on) {
    test.depends_on = test.depends_on.map(d => variantIds.has(d) ? d + SUFFIX : d)
  }
  suite.tests.push(test)
}

const symbols = {
  '✅': 'pass',
  '⛔️': 'fail',
  '⚠️': 'optional_fail',
  Y: 'yes',
  N: 'no',
  '🔹': 'setup_fail',
  '⁉️': 'harness_fail',
  '⚪️': 'dependency_fail',
  '↻': 'retry',
  '-': 'untested'
}

await runTests(suites, fetch, false, base)
const results = getResults()
const out = []
for (const suite of suites) {
  for (const test of suite.tests) {
    if (test.browser_only === true) continue
    const verdict = determineTestResult(suites, test.id, results)
    const result = results[test.id]
    out.push({
      id: test.id,
      name: test.name,
      suite: suite.id,
      kind: test.kind || 'required',
      outcome: symbols[verdict[2]] || verdict[2],
      detail: Array.isArray(result) ? result.join(': ') : ''
    })
  }
}
fs.writeFileSync(outFile, JSON.stringify(out, null, 1))
console.log(`${out.length} tests, ${variants.length} of them max-age variants`)
