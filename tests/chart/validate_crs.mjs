// Validates the chart's custom resources against their CRDs' OpenAPI schemas, compiled by
// @kubernetes-models (prometheus-operator, KEDA). Input: a JSON list of {case, doc}.
import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";

// Group entry points (the packages export these, not single kinds), from the working
// directory's node_modules.
import { existsSync } from "node:fs";
const group = (pkg, api) => {
  const dir = `${process.cwd()}/node_modules/@kubernetes-models/${pkg}/${api}`;
  const file = existsSync(`${dir}/index.mjs`) ? `${dir}/index.mjs` : `${dir}/index.js`;
  return import(pathToFileURL(file).href);
};
const models = {
  "monitoring.coreos.com/v1": await group("prometheus-operator", "monitoring.coreos.com/v1"),
  "keda.sh/v1alpha1": await group("keda", "keda.sh/v1alpha1"),
};
let failed = 0;
const counts = {};
for (const { case: c, doc } of JSON.parse(readFileSync(process.argv[2], "utf8"))) {
  const key = `${doc.apiVersion}/${doc.kind}`;
  const Model = models[doc.apiVersion]?.[doc.kind];
  if (!Model) {
    console.log(`${c}: no schema for ${key}`);
    failed++;
    continue;
  }
  try {
    new Model(doc).validate();
    counts[key] = (counts[key] || 0) + 1;
  } catch (e) {
    console.log(`${c}: ${key} ${doc.metadata.name}: ${e.message}`);
    failed++;
  }
}
console.log(`custom resources valid against their CRDs: ${JSON.stringify(counts)}`);
process.exit(failed ? 1 : 0);
