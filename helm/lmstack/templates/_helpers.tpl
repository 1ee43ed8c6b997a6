{{/* Names, labels and images shared by every template. */}}

{{- define "lmstack.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "lmstack.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/part-of: lmstack
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "router"). */}}
{{- define "lmstack.selectorLabels" -}}
app.kubernetes.io/name: lmstack
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* An lmstack image: (dict "root" $ "spec" .Values.routerSpec). */}}
{{- define "lmstack.image" -}}
{{- printf "%s:%s" .spec.repository (default .root.Chart.AppVersion .spec.tag) -}}
{{- end -}}

{{/* A DNS-1035 name for one model's objects: <fullname>-<model name>-engine. */}}
{{- define "lmstack.engineName" -}}
{{- printf "%s-%s-engine" (include "lmstack.fullname" .root) .model.name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "lmstack.routerName" -}}{{ include "lmstack.fullname" . }}-router{{- end -}}
{{- define "lmstack.controlName" -}}{{ include "lmstack.fullname" . }}-control{{- end -}}
{{- define "lmstack.agentName" -}}{{ include "lmstack.fullname" . }}-agent{{- end -}}
{{- define "lmstack.cacheserverName" -}}{{ include "lmstack.fullname" . }}-cacheserver{{- end -}}

{{/* Whether the Prometheus Operator objects render: true, false or "auto" (the CRD is served). */}}
{{- define "lmstack.operatorEnabled" -}}
{{- $v := .value -}}
{{- if eq (toString $v) "auto" -}}
{{- if .root.Capabilities.APIVersions.Has "monitoring.coreos.com/v1" -}}true{{- end -}}
{{- else if $v -}}true{{- end -}}
{{- end -}}

{{/* Prometheus scrape annotations: (dict "root" $ "port" 8001), and "https" true for a TLS port. */}}
{{- define "lmstack.scrapeAnnotations" -}}
{{- if .root.Values.monitoring.annotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- if .https }}
prometheus.io/scheme: https
{{- end }}
{{- end }}
{{- end -}}

{{/* The router's port name: https when it serves TLS (routerSpec.tls.secretName), else http. */}}
{{- define "lmstack.routerPort" -}}
{{- if .Values.routerSpec.tls.secretName }}https{{ else }}http{{ end -}}
{{- end -}}

{{/* The agent container, used by the agent DaemonSet and by the router in daemonset mode. */}}
{{- define "lmstack.agentContainer" -}}
{{- $a := .Values.agentSpec -}}
- name: agent
  image: {{ include "lmstack.image" (dict "root" . "spec" $a) }}
  imagePullPolicy: {{ $a.imagePullPolicy }}
  args:
    - --listen=0.0.0.0:{{ $a.containerPort }}
    - --source=kube
    - --label-selector=lmstack.io/role=engine,app.kubernetes.io/instance={{ .Release.Name }}
    - --model-label=model
    {{- if .Values.controlSpec.namespaced }}
    - --watch-namespace={{ .Release.Namespace }}
    {{- end }}
    - --cgroup-root={{ $a.hostPaths.cgroup }}
    - --burst-window-us={{ $a.burstWindowUs }}
    - --drain-interval-ms={{ $a.drainIntervalMs }}
    - --max-streams={{ $a.maxStreams }}
    - --log-level={{ $a.logLevel }}
    {{- if $a.bpfStats }}
    - --bpf-stats
    {{- end }}
    {{- range $a.extraArgs }}
    - {{ . | quote }}
    {{- end }}
  env:
    - name: NODE_NAME
      valueFrom:
        fieldRef:
          fieldPath: spec.nodeName
  ports:
    - name: agent-metrics
      containerPort: {{ $a.containerPort }}
      protocol: TCP
  readinessProbe:
    httpGet:
      path: /health
      port: agent-metrics
    periodSeconds: 10
  livenessProbe:
    httpGet:
      path: /health
      port: agent-metrics
    periodSeconds: 20
    failureThreshold: 3
  securityContext:
    {{- if $a.privileged }}
    privileged: true
    {{- else }}
    privileged: false
    allowPrivilegeEscalation: false
    capabilities:
      drop: [ALL]
      add: {{ toJson $a.capabilities }}
    {{- end }}
    readOnlyRootFilesystem: true
  resources:
    {{- toYaml $a.resources | nindent 4 }}
  volumeMounts:
    - name: cgroup
      mountPath: {{ $a.hostPaths.cgroup }}
      readOnly: true
    - name: bpffs
      mountPath: {{ $a.hostPaths.bpf }}
    - name: tracefs
      mountPath: {{ $a.hostPaths.tracing }}
      readOnly: true
{{- end -}}

{{- define "lmstack.agentVolumes" -}}
{{- $a := .Values.agentSpec -}}
- name: cgroup
  hostPath:
    path: {{ $a.hostPaths.cgroup }}
    type: Directory
- name: bpffs
  hostPath:
    path: {{ $a.hostPaths.bpf }}
    type: DirectoryOrCreate
- name: tracefs
  hostPath:
    path: {{ $a.hostPaths.tracing }}
    type: Directory
{{- end -}}

{{/* Engine Services as static backends (routers without lmstack-control). */}}
{{- define "lmstack.staticBackends" -}}
{{- $root := . -}}
{{- $urls := list -}}
{{- range $m := .Values.servingEngineSpec.modelSpec -}}
{{- $urls = append $urls (printf "http://%s:%v" (include "lmstack.engineName" (dict "root" $root "model" $m)) $root.Values.servingEngineSpec.servicePort) -}}
{{- end -}}
{{- join "," $urls -}}
{{- end -}}

{{/* An OTLP/HTTP traces URL: the endpoint, with /v1/traces when it names no path (as lmstack
reads tracing.otlp_endpoint; vLLM's HTTP exporter takes the URL as given). */}}
{{- define "lmstack.otlpTracesUrl" -}}
{{- $u := trimSuffix "/" . -}}
{{- if regexMatch "^https?://[^/]+$" $u -}}{{ $u }}/v1/traces{{- else -}}{{ $u }}{{- end -}}
{{- end }}
