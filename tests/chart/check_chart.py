"""Checks helm/lmstack: strict lint, renders for every values file in helm/lmstack/ci/, strict
validation of every object against Kubernetes' schemas (kubernetes-validate), the custom
resources against their CRDs' schemas (@kubernetes-models, through node), the values schema,
and assertions on what matters (RBAC, privileges, selectors, ports, probes, scrapes).

Usage: check_chart.py CHART OUT_DIR NODE_TOOLS_DIR (run by tests/tests/chart.rs)."""
import glob, json, os, subprocess, sys
import yaml
import helm_python as helm

CHART, OUT, NODE = (os.path.abspath(a) for a in sys.argv[1:4])
KUBE = "1.33.0"
failures = []

def fail(case, msg):
    failures.append(f"{case}: {msg}")

lint = helm.lint(CHART, strict=True, kube_version=KUBE)
if lint["errors"] or any(m["severity"] >= 2 for m in lint["messages"]):
    fail("lint", json.dumps(lint))

chart = helm.Chart.load(CHART)
cases = {os.path.basename(p)[:-5]: yaml.safe_load(open(p)) for p in sorted(glob.glob(f"{CHART}/ci/*.yaml"))}
assert len(cases) >= 4, cases.keys()

# --- the values schema rejects bad values with a message naming the field
bad = {
    "routingLogic": ({"routerSpec": {"routingLogic": "fastest"}}, "routingLogic"),
    "unknown key": ({"routerSpec": {"replicas": 2}}, "replicas"),
    "model without modelURL": ({"servingEngineSpec": {"modelSpec": [{"name": "m", "repository": "r", "tag": "t",
                                "replicaCount": 1, "requestCPU": 1, "requestMemory": "1Gi"}]}}, "modelURL"),
    "model name": ({"servingEngineSpec": {"modelSpec": [{"name": "Llama_3", "repository": "r", "tag": "t", "modelURL": "x",
                    "replicaCount": 1, "requestCPU": 1, "requestMemory": "1Gi"}]}}, "name"),
    "mode": ({"routerSpec": {"mode": "statefulset"}}, "mode"),
    "tls": ({"routerSpec": {"tls": {"secret": "router-tls"}}}, "secret"),
    "otlp https": ({"routerSpec": {"otlpTracesEndpoint": "https://collector:4318"}}, "otlpTracesEndpoint"),
    "sample ratio": ({"routerSpec": {"otlpSampleRatio": 2}}, "otlpSampleRatio"),
}
for what, (values, field) in bad.items():
    try:
        chart.render(values, name="lmstack", namespace="llm")
        fail("schema", f"{what}: rendered without complaint")
    except helm.HelmError as e:
        if field not in str(e):
            fail("schema", f"{what}: message does not name {field}: {e}")

def docs_of(rendered):
    out = []
    for path, text in sorted(rendered.items()):
        if not path.endswith(".yaml"):
            continue
        for d in yaml.safe_load_all(text):
            if d:
                out.append(d)
    return out

BUILTIN_GROUPS = ("", "v1", "apps/v1", "rbac.authorization.k8s.io/v1", "autoscaling/v2", "policy/v1")
crs = []
for case, values in cases.items():
    rendered = chart.render(values, name="lmstack", namespace="llm")
    docs = docs_of(rendered)
    d_out = os.path.join(OUT, case)
    os.makedirs(d_out, exist_ok=True)
    for i, d in enumerate(docs):
        with open(os.path.join(d_out, f"{i:02d}-{d['kind']}-{d['metadata']['name']}.yaml"), "w") as f:
            yaml.safe_dump(d, f)
    native = [os.path.join(d_out, f) for f in sorted(os.listdir(d_out))
              if yaml.safe_load(open(os.path.join(d_out, f)))["apiVersion"] in BUILTIN_GROUPS]
    r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "kubernetes-validate"), "--strict",
                        "-k", KUBE, "--quiet", *native], capture_output=True, text=True)
    if r.returncode != 0 or "ERROR" in r.stdout or "WARN" in r.stdout:
        fail(case, "kubernetes-validate: " + r.stdout + r.stderr)
    crs += [{"case": case, "doc": d} for d in docs if d["apiVersion"] not in BUILTIN_GROUPS]

    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    workloads = by_kind.get("Deployment", []) + by_kind.get("DaemonSet", [])
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}

    def pod_ports(w):
        return {p["name"]: p["containerPort"] for c in w["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}

    for w in workloads:
        n = w["metadata"]["name"]
        tmpl = w["spec"]["template"]
        labels = tmpl["metadata"]["labels"]
        for k, v in w["spec"]["selector"]["matchLabels"].items():
            if labels.get(k) != v:
                fail(case, f"{n}: selector {k}={v} not in the pod labels")
        ports = pod_ports(w)
        for c in tmpl["spec"]["containers"]:
            for probe in ("readinessProbe", "livenessProbe"):
                if probe not in c:
                    fail(case, f"{n}/{c['name']}: no {probe}")
                    continue
                port = (c[probe].get("httpGet") or c[probe].get("tcpSocket"))["port"]
                if port not in ports:
                    fail(case, f"{n}/{c['name']}: {probe} on unknown port {port}")
            sc = c.get("securityContext", {})
            if c["name"] == "agent":
                caps = set(sc.get("capabilities", {}).get("add", []))
                if not sc.get("privileged") and not {"BPF", "PERFMON"} <= caps:
                    fail(case, f"{n}: the agent can load no BPF program: {sc}")
                mounts = {m["mountPath"] for m in c["volumeMounts"]}
                if not {"/sys/fs/cgroup", "/sys/fs/bpf", "/sys/kernel/tracing"} <= mounts:
                    fail(case, f"{n}: the agent lacks host mounts: {mounts}")
            elif c["name"] in ("router", "control"):
                if sc.get("privileged") or sc.get("allowPrivilegeEscalation", True) or not sc.get("runAsNonRoot"):
                    fail(case, f"{n}/{c['name']}: runs with privileges: {sc}")
                if sc.get("capabilities", {}).get("drop") != ["ALL"]:
                    fail(case, f"{n}/{c['name']}: keeps capabilities")
            elif sc.get("privileged"):
                fail(case, f"{n}/{c['name']}: privileged")
        ann = tmpl["metadata"].get("annotations", {})
        # Everything but the LMCache server (no /metrics) is scraped.
        if values.get("monitoring", {}).get("annotations", True) and not n.endswith("-cacheserver"):
            if ann.get("prometheus.io/scrape") != "true" or int(ann["prometheus.io/port"]) not in ports.values():
                fail(case, f"{n}: scrape annotations missing or on a port it does not open: {ann}")
        if labels.get("lmstack.io/role") == "engine":
            c = tmpl["spec"]["containers"][0]
            if "--enable-prefix-caching" not in c["args"] or "model" not in labels or "container-port" not in ports:
                fail(case, f"{n}: engine without prefix caching, model label or container-port")
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            model = next(m for m in values["servingEngineSpec"]["modelSpec"] if m["name"] == labels["model"])
            lmc = model.get("lmcacheConfig", {})
            if lmc.get("enabled"):
                if not any(a.startswith("--kv-transfer-config") and "LMCacheConnectorV1" in a for a in c["args"]):
                    fail(case, f"{n}: LMCache on but no LMCache connector")
                if env.get("LMCACHE_MAX_LOCAL_CPU_SIZE") != str(lmc["cpuOffloadingBufferSize"]):
                    fail(case, f"{n}: CPU offloading buffer not set: {env}")
                if values.get("cacheserverSpec", {}).get("enabled"):
                    url = env.get("LMCACHE_REMOTE_URL", "")
                    host, port = url.removeprefix("lm://").split(":")
                    svc = next((s for s in by_kind["Service"] if s["metadata"]["name"] == host), None)
                    if not svc or int(port) not in [p["port"] for p in svc["spec"]["ports"]]:
                        fail(case, f"{n}: LMCACHE_REMOTE_URL {url} names no cache server Service port")
            if model.get("pvcStorage") and ("PersistentVolumeClaim", n) not in names:
                fail(case, f"{n}: pvcStorage without a PVC")
            if model.get("hf_token") and "HF_TOKEN" not in env:
                fail(case, f"{n}: hf_token not passed")
        if n.endswith("-router"):
            args = tmpl["spec"]["containers"][0]["args"]
            tls = values.get("routerSpec", {}).get("tls", {}).get("secretName")
            if tls:
                # The Secret mounted whole (its files swap on an update), named by the flags,
                # and probes and scrapes in HTTPS.
                router = tmpl["spec"]["containers"][0]
                vols = {v["name"]: v for v in tmpl["spec"]["volumes"]}
                mount = next((m for m in router["volumeMounts"] if vols.get(m["name"], {}).get("secret", {}).get("secretName") == tls), None)
                if not mount or "subPath" in mount:
                    fail(case, f"{n}: Secret {tls} not mounted whole: {router['volumeMounts']}")
                else:
                    for flag, file in (("--tls-cert", "tls.crt"), ("--tls-key", "tls.key")):
                        if f"{flag}={mount['mountPath']}/{file}" not in args:
                            fail(case, f"{n}: {flag} does not name {file} in {mount['mountPath']}: {args}")
                for probe in ("readinessProbe", "livenessProbe"):
                    if router[probe]["httpGet"].get("scheme") != "HTTPS":
                        fail(case, f"{n}: {probe} not in HTTPS")
                if values.get("monitoring", {}).get("annotations", True) and ann.get("prometheus.io/scheme") != "https":
                    fail(case, f"{n}: scrape annotations not in HTTPS: {ann}")
                for sm in by_kind.get("ServiceMonitor", []):
                    if sm["metadata"]["name"].endswith("-router") and sm["spec"]["endpoints"][0].get("scheme") != "https":
                        fail(case, f"ServiceMonitor {sm['metadata']['name']}: scrapes the TLS port in plain HTTP")
            elif any(a.startswith("--tls-") for a in args):
                fail(case, f"{n}: TLS flags without routerSpec.tls.secretName: {args}")
            control_url = next((a.split("=", 1)[1] for a in args if a.startswith("--control-url=")), None)
            if control_url:
                host, port = control_url.removeprefix("http://").split(":")
                svc = next((s for s in by_kind["Service"] if s["metadata"]["name"] == host), None)
                if not svc or int(port) not in [p["port"] for p in svc["spec"]["ports"]]:
                    fail(case, f"{n}: --control-url {control_url} names no control Service port")
            elif not any(a.startswith("--static-backends=http") for a in args):
                fail(case, f"{n}: neither control nor static backends")
            if w["kind"] == "DaemonSet" and values.get("agentSpec", {}).get("enabled"):
                if "agent" not in [c["name"] for c in tmpl["spec"]["containers"]]:
                    fail(case, f"{n}: daemonset mode without the agent beside the router")

    # Services select a workload's pods and target ports those pods open.
    for s in by_kind.get("Service", []):
        sel = s["spec"]["selector"]
        match = [w for w in workloads if all(w["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in sel.items())]
        if not match:
            fail(case, f"Service {s['metadata']['name']} selects no pods")
        for p in s["spec"]["ports"]:
            if not all(p["targetPort"] in pod_ports(w) for w in match):
                fail(case, f"Service {s['metadata']['name']}: targetPort {p['targetPort']} not opened by its pods")
    # RBAC: read-only on pods and EndpointSlices, bound to service accounts that exist and are used.
    sas = {d["metadata"]["name"] for d in by_kind.get("ServiceAccount", [])}
    for role in by_kind.get("Role", []) + by_kind.get("ClusterRole", []):
        for rule in role["rules"]:
            if set(rule["verbs"]) - {"get", "list", "watch"} or set(rule["resources"]) - {"pods", "endpointslices"}:
                fail(case, f"{role['kind']} {role['metadata']['name']} grants more than reading pods: {rule}")
    for b in by_kind.get("RoleBinding", []) + by_kind.get("ClusterRoleBinding", []):
        if (b["roleRef"]["kind"], b["roleRef"]["name"]) not in names:
            fail(case, f"{b['metadata']['name']} binds a missing role")
        for sub in b["subjects"]:
            if sub["name"] not in sas:
                fail(case, f"{b['metadata']['name']} binds a missing service account {sub['name']}")
    for w in workloads:
        sa = w["spec"]["template"]["spec"].get("serviceAccountName")
        if sa and sa not in sas:
            fail(case, f"{w['metadata']['name']} uses a missing service account {sa}")
    # Monitors select Services/pods that exist and scrape ports they have.
    for sm in by_kind.get("ServiceMonitor", []):
        sel = sm["spec"]["selector"]["matchLabels"]
        svcs = [s for s in by_kind["Service"] if all(s["metadata"]["labels"].get(k) == v for k, v in sel.items())]
        if not svcs or not all(sm["spec"]["endpoints"][0]["port"] in [p["name"] for p in s["spec"]["ports"]] for s in svcs):
            fail(case, f"ServiceMonitor {sm['metadata']['name']} selects no Service with its port")
    for pm in by_kind.get("PodMonitor", []):
        sel = pm["spec"]["selector"]["matchLabels"]
        pods = [w for w in workloads if all(w["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in sel.items())]
        if not pods or not all(pm["spec"]["podMetricsEndpoints"][0]["port"] in pod_ports(w) for w in pods):
            fail(case, f"PodMonitor {pm['metadata']['name']} selects no pods with its port")
    for so in by_kind.get("ScaledObject", []) + by_kind.get("HorizontalPodAutoscaler", []):
        t = so["spec"]["scaleTargetRef"]
        if ("Deployment", t["name"]) not in names:
            fail(case, f"{so['kind']} {so['metadata']['name']} scales a missing Deployment {t['name']}")
    for so in by_kind.get("ScaledObject", []):
        if "vllm:num_requests_waiting" not in so["spec"]["triggers"][0]["metadata"]["query"]:
            fail(case, "ScaledObject not on vllm:num_requests_waiting")
    dashboards = [c for c in by_kind.get("ConfigMap", []) if c["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    if len(dashboards) != len(glob.glob(f"{CHART}/dashboards/*.json")) or not dashboards:
        fail(case, f"dashboards: {len(dashboards)} ConfigMaps")
    for c in dashboards:
        for text in c["data"].values():
            json.loads(text)
    # Tracing: the router exports where routerSpec says, engines where servingEngineSpec says
    # (the traces URL, over OTLP/HTTP protobuf); without them, no tracing flag at all.
    r_otlp = values.get("routerSpec", {}).get("otlpTracesEndpoint")
    e_otlp = values.get("servingEngineSpec", {}).get("otlpTracesEndpoint")
    for w in workloads:
        for c in w["spec"]["template"]["spec"]["containers"]:
            args = c.get("args") or []
            flags = [a for a in args if a.startswith("--otlp-")]
            env = {e["name"]: e.get("value") for e in c.get("env") or []}
            if c["name"] == "router":
                want = [f"--otlp-traces-endpoint={r_otlp}",
                        f"--otlp-sample-ratio={values['routerSpec'].get('otlpSampleRatio', 1)}"] if r_otlp else []
                if flags != want:
                    fail(case, f"router tracing flags {flags}, expected {want}")
            elif w["metadata"].get("labels", {}).get("lmstack.io/role") == "engine":
                want = [f"--otlp-traces-endpoint={e_otlp.rstrip('/')}/v1/traces"] if e_otlp else []
                if flags != want:
                    fail(case, f"engine tracing flags {flags}, expected {want}")
                if e_otlp and env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") != "http/protobuf":
                    fail(case, f"engine without OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf: {env}")
    # API keys: the Secret mounted as a directory (a subPath mount would never see updates).
    keys = values.get("routerSpec", {}).get("apiKeys", {}).get("secretName")
    if keys:
        routers = [w for w in by_kind.get("Deployment", []) + by_kind.get("DaemonSet", [])
                   if w["metadata"]["name"].endswith("-router")]
        for w in routers:
            pod = w["spec"]["template"]["spec"]
            c = next(c for c in pod["containers"] if c["name"] == "router")
            if "--api-keys=/etc/lmstack-keys/keys.yaml" not in c["args"]:
                fail(case, f"router without --api-keys: {c['args']}")
            mounts = [m for m in c["volumeMounts"] if m["mountPath"] == "/etc/lmstack-keys"]
            if not mounts or mounts[0].get("subPath") or not mounts[0].get("readOnly"):
                fail(case, f"keys not mounted read-only as a directory: {c['volumeMounts']}")
            vols = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == keys]
            if not vols:
                fail(case, f"no volume from Secret {keys}")
        if not routers:
            fail(case, "apiKeys set, no router")
    notes = rendered.get("lmstack/templates/NOTES.txt", "")
    tls = values.get("routerSpec", {}).get("tls", {}).get("secretName")
    if ("curl -k https" if tls else "curl http") + "://127.0.0.1:8001/v1/chat/completions" not in notes:
        fail(case, "NOTES.txt does not show the first request")
    print(f"{case}: {len(docs)} objects, {len(native)} validated against Kubernetes {KUBE}, "
          f"{len(docs) - len(native)} custom resources")

# Custom resources against their CRDs' schemas (prometheus-operator, KEDA).
crs_path = os.path.join(OUT, "custom-resources.json")
json.dump(crs, open(crs_path, "w"))
r = subprocess.run(["node", os.path.join(os.path.dirname(__file__), "validate_crs.mjs"), crs_path],
                   capture_output=True, text=True, cwd=NODE)
print(r.stdout.strip())
if r.returncode != 0:
    fail("custom resources", r.stdout + r.stderr)

if failures:
    print("\n".join(failures))
    sys.exit(1)
print(f"chart OK: lint strict, {len(cases)} values files, schema rejects {len(bad)} bad values")
