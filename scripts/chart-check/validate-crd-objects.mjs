// Validates objects of other projects' CRDs against those CRDs' schemas, as packaged by
// @kubernetes-models: the prometheus-operator's ServiceMonitor, PodMonitor and PrometheusRule
// (the chart's monitoring) and KEDA's ScaledObject and TriggerAuthentication (what
// dedup-operator makes in `keda` mode): types, enums, patterns and required fields. Those
// validators let unknown fields through (as the API server prunes them silently), so the
// members written are also checked against the interfaces generated from the same CRDs: a
// misspelt field fails here instead of vanishing.
//
// stdin: a JSON array of {"where": "...", "object": {...}}. Prints one line per problem and
// exits 1 when there is any.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import { TriggerAuthentication } from "@kubernetes-models/keda/keda.sh/v1alpha1/TriggerAuthentication";

const require = createRequire(import.meta.url);
const dir = (pkg, group) => join(dirname(require.resolve(`@kubernetes-models/${pkg}/package.json`)), group);
const MONITORING = dir("prometheus-operator", join("monitoring.coreos.com", "v1"));
const KEDA = dir("keda", join("keda.sh", "v1alpha1"));

/** Field names an interface file declares, with those of the interfaces it extends. */
function fields(file) {
  const text = readFileSync(file, "utf8");
  const names = new Set([...text.matchAll(/^ {4}"([^"]+)"\??:/gm)].map((m) => m[1]));
  const head = text.match(/export interface \w+ extends ([\w, ]+) \{/);
  for (const base of head ? head[1].split(",").map((b) => b.trim()) : []) {
    const from = text.match(new RegExp(`import \\{ ${base} \\} from "\\./([\\w]+)\\.js"`));
    if (from) for (const name of fields(join(dirname(file), `${from[1]}.d.ts`))) names.add(name);
  }
  return names;
}

const KINDS = {
  ServiceMonitor: { model: ServiceMonitor, dir: MONITORING, spec: "ServiceMonitorSpec", lists: { endpoints: "Endpoint" } },
  PodMonitor: { model: PodMonitor, dir: MONITORING, spec: "PodMonitorSpec", lists: { podMetricsEndpoints: "PodMetricsEndpoint" } },
  PrometheusRule: { model: PrometheusRule, dir: MONITORING, spec: "PrometheusRuleSpec", lists: { groups: "RuleGroup" } },
  ScaledObject: { model: ScaledObject, dir: KEDA, spec: "ScaledObjectSpec", lists: { triggers: "ScaleTriggers" } },
  TriggerAuthentication: { model: TriggerAuthentication, dir: KEDA, spec: "TriggerAuthenticationSpec", lists: { secretTargetRef: "AuthTargetRef" } },
};

const problems = [];
const unknown = (where, path, object, names) => {
  for (const key of Object.keys(object ?? {})) {
    if (!names.has(key)) problems.push(`${where}: ${path}.${key} is not a field of the CRD`);
  }
};
for (const { where, object } of JSON.parse(readFileSync(0, "utf8"))) {
  const kind = KINDS[object.kind];
  if (!kind) {
    problems.push(`${where}: no schema for kind ${object.kind}`);
    continue;
  }
  try {
    new kind.model(object).validate();
  } catch (e) {
    problems.push(`${where}: ${e.message}`);
  }
  unknown(where, "", object, new Set(["apiVersion", "kind", "metadata", "spec"]));
  const allowed = (type) => fields(join(kind.dir, `${type}.d.ts`));
  unknown(where, "spec", object.spec, allowed(kind.spec));
  for (const [list, type] of Object.entries(kind.lists)) {
    (object.spec?.[list] ?? []).forEach((item, i) => {
      unknown(where, `spec.${list}[${i}]`, item, allowed(type));
      if (list === "groups") {
        (item.rules ?? []).forEach((rule, j) => unknown(where, `spec.groups[${i}].rules[${j}]`, rule, allowed("Rule")));
      }
    });
  }
  if (object.kind === "ScaledObject") {
    unknown(where, "spec.advanced", object.spec?.advanced, allowed("AdvancedConfig"));
    unknown(where, "spec.scaleTargetRef", object.spec?.scaleTargetRef, allowed("ScaleTarget"));
  }
}
for (const p of problems) console.log(p);
process.exit(problems.length ? 1 : 0);
