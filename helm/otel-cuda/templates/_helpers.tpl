{{/* Names ------------------------------------------------------------------------------------------------- */}}
{{- define "otel-cuda.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "otel-cuda.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "<fullname>-<component>", kept within 63 characters. */}}
{{- define "otel-cuda.component" -}}
{{- printf "%s-%s" (include "otel-cuda.fullname" .ctx | trunc (int (sub 62 (len .name))) | trimSuffix "-") .name }}
{{- end }}

{{- define "otel-cuda.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "otel-cuda.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "otel-cuda.selectorLabels" -}}
app.kubernetes.io/name: {{ include "otel-cuda.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of one component: pass (dict "ctx" $ "component" "vllm"). */}}
{{- define "otel-cuda.componentLabels" -}}
{{ include "otel-cuda.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "otel-cuda.componentSelector" -}}
{{ include "otel-cuda.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "otel-cuda.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "otel-cuda.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "otel-cuda.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Validation: fail with a remedy instead of rendering something that cannot work. */}}
{{- define "otel-cuda.validate" -}}
{{- if not (has .Values.mode (list "sidecar" "daemonset")) }}
{{- fail (printf "mode must be sidecar or daemonset, not %q" .Values.mode) }}
{{- end }}
{{- if and (eq .Values.mode "sidecar") (not .Values.vllm.enabled) }}
{{- fail "mode=sidecar runs otel-cuda inside the vLLM pod: set vllm.enabled=true, or use mode=daemonset to trace pods deployed elsewhere" }}
{{- end }}
{{- if and (not .Values.agent.otlp.endpoint) (not .Values.collector.enabled) }}
{{- fail "set agent.otlp.endpoint to your OpenTelemetry Collector (for example http://otel-collector.observability:4317), or collector.enabled=true" }}
{{- end }}
{{- if and .Values.collector.enabled (not .Values.jaeger.enabled) (not .Values.jaeger.endpoint) }}
{{- fail "the bundled Collector exports spans to Jaeger: set jaeger.enabled=true or jaeger.endpoint=HOST:4317" }}
{{- end }}
{{- if and .Values.collector.enabled (eq .Values.collector.config "remote-write") (not .Values.prometheus.enabled) (not .Values.collector.remoteWriteUrl) }}
{{- fail "collector.config=remote-write needs collector.remoteWriteUrl or prometheus.enabled=true" }}
{{- end }}
{{- if and .Values.collector.enabled (eq .Values.collector.config "s3") (not .Values.collector.s3.bucket) }}
{{- fail "collector.config=s3 needs collector.s3.bucket" }}
{{- end }}
{{- if and (hasPrefix "s3://" .Values.agent.archive.destination) (not .Values.agent.s3.existingSecret) (not .Values.serviceAccount.annotations) }}
{{- /* Not an error: boto3 may find an instance profile or pod identity. NOTES.txt says so. */}}
{{- end }}
{{- end }}

{{/* The --k8s mode the sidecar runs with. */}}
{{- define "otel-cuda.k8sMode" -}}
{{- if ne .Values.agent.k8sAttributes "auto" }}{{ .Values.agent.k8sAttributes }}
{{- else if eq .Values.mode "daemonset" }}api
{{- else }}downward
{{- end }}
{{- end }}

{{- define "otel-cuda.otlpEndpoint" -}}
{{- if .Values.agent.otlp.endpoint }}{{ .Values.agent.otlp.endpoint }}
{{- else if eq .Values.agent.otlp.protocol "grpc" }}http://{{ include "otel-cuda.component" (dict "ctx" . "name" "collector") }}:4317
{{- else }}http://{{ include "otel-cuda.component" (dict "ctx" . "name" "collector") }}:4318
{{- end }}
{{- end }}

{{/* Where vLLM sends its spans: the otel-cuda receiver beside it (sidecar) or on its node (daemonset). */}}
{{- define "otel-cuda.vllmTracesEndpoint" -}}
{{- if .Values.vllm.otlpTracesEndpoint }}{{ .Values.vllm.otlpTracesEndpoint }}
{{- else if eq .Values.mode "sidecar" }}http://127.0.0.1:{{ .Values.agent.receiver.grpcPort }}
{{- else if .Values.daemonset.receiverService.enabled }}http://{{ include "otel-cuda.component" (dict "ctx" . "name" "receiver") }}.{{ .Release.Namespace }}.svc:{{ .Values.agent.receiver.grpcPort }}
{{- else }}http://$(HOST_IP):{{ .Values.agent.receiver.grpcPort }}
{{- end }}
{{- end }}

{{/* The capabilities of the otel-cuda container: the documented set plus agent.security.extraCapabilities. */}}
{{- define "otel-cuda.capabilities" -}}
{{- $caps := list "BPF" "PERFMON" "SYS_PTRACE" "SYS_RESOURCE" }}
{{- range .Values.agent.security.extraCapabilities }}
{{- $caps = append $caps (trimPrefix "CAP_" (upper .)) }}
{{- end }}
{{- toJson (uniq $caps) }}
{{- end }}

{{/* The otel-cuda container, shared by the sidecar and the DaemonSet. */}}
{{- define "otel-cuda.agentContainer" -}}
{{- $v := .Values -}}
{{- $daemon := eq $v.mode "daemonset" -}}
{{- $receiverHost := ternary "0.0.0.0" "127.0.0.1" $daemon -}}
name: otel-cuda
image: {{ include "otel-cuda.image" . }}
imagePullPolicy: {{ $v.image.pullPolicy }}
args:
  - run
  - --match={{ $v.agent.match }}
  - --k8s={{ include "otel-cuda.k8sMode" . }}
  {{- if and $daemon $v.agent.podSelector }}
  - --pod-selector={{ $v.agent.podSelector }}
  {{- end }}
  - --receiver-grpc={{ $receiverHost }}:{{ $v.agent.receiver.grpcPort }}
  - --receiver-http={{ $receiverHost }}:{{ $v.agent.receiver.httpPort }}
  - --metrics-address=0.0.0.0:{{ $v.agent.metricsPort }}
  - --health-address=0.0.0.0:{{ $v.agent.healthPort }}
  - --archive={{ default "/var/lib/otel-cuda/archive" $v.agent.archive.destination }}
  {{- if hasPrefix "s3://" $v.agent.archive.destination }}
  - --archive-buffer=/var/lib/otel-cuda/buffer
  {{- end }}
  - --archive-quota-bytes={{ int64 $v.agent.archive.quotaBytes }}
  - --archive-rotate-seconds={{ $v.agent.archive.rotateSeconds }}
  - --archive-retention-days={{ $v.agent.archive.retentionDays }}
  - --log-level={{ $v.agent.logLevel }}
  {{- range $v.agent.extraArgs }}
  - {{ . | quote }}
  {{- end }}
env:
  - name: OTEL_EXPORTER_OTLP_ENDPOINT
    value: {{ include "otel-cuda.otlpEndpoint" . | quote }}
  - name: OTEL_EXPORTER_OTLP_PROTOCOL
    value: {{ $v.agent.otlp.protocol | quote }}
  - name: OTEL_SERVICE_NAME
    value: {{ $v.agent.serviceName | quote }}
  {{- with $v.agent.resourceAttributes }}
  - name: OTEL_RESOURCE_ATTRIBUTES
    value: {{ include "otel-cuda.kvList" . | quote }}
  {{- end }}
  - name: K8S_NODE_NAME
    valueFrom: {fieldRef: {fieldPath: spec.nodeName}}
  {{- if not $daemon }}
  - name: K8S_POD_NAME
    valueFrom: {fieldRef: {fieldPath: metadata.name}}
  - name: K8S_POD_UID
    valueFrom: {fieldRef: {fieldPath: metadata.uid}}
  - name: K8S_NAMESPACE
    valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
  - name: K8S_CONTAINER_NAME
    value: vllm
  {{- end }}
  {{- with $v.agent.s3.region }}
  - name: AWS_REGION
    value: {{ . | quote }}
  {{- end }}
  {{- with $v.agent.s3.endpoint }}
  - name: AWS_ENDPOINT_URL_S3
    value: {{ . | quote }}
  {{- end }}
  {{- with $v.agent.s3.existingSecret }}
  - name: AWS_ACCESS_KEY_ID
    valueFrom: {secretKeyRef: {name: {{ . | quote }}, key: {{ $v.agent.s3.accessKeyIdKey | quote }}}}
  - name: AWS_SECRET_ACCESS_KEY
    valueFrom: {secretKeyRef: {name: {{ . | quote }}, key: {{ $v.agent.s3.secretAccessKeyKey | quote }}}}
  {{- end }}
  - name: PYTHONDONTWRITEBYTECODE
    value: "1"
  {{- with $v.agent.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
ports:
  - name: otlp-grpc
    containerPort: {{ $v.agent.receiver.grpcPort }}
    {{- if and $daemon $v.daemonset.hostPort }}
    hostPort: {{ $v.agent.receiver.grpcPort }}
    {{- end }}
  - name: otlp-http
    containerPort: {{ $v.agent.receiver.httpPort }}
    {{- if and $daemon $v.daemonset.hostPort }}
    hostPort: {{ $v.agent.receiver.httpPort }}
    {{- end }}
  - name: metrics
    containerPort: {{ $v.agent.metricsPort }}
  - name: health
    containerPort: {{ $v.agent.healthPort }}
{{- with $v.agent.probes.startup }}
startupProbe:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.agent.probes.liveness }}
livenessProbe:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if or $daemon $v.agent.sidecarReadiness }}
{{- with $v.agent.probes.readiness }}
readinessProbe:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
resources:
  {{- toYaml $v.agent.resources | nindent 2 }}
securityContext:
  {{- if $v.agent.security.privileged }}
  privileged: true
  {{- else }}
  privileged: false
  allowPrivilegeEscalation: false
  capabilities:
    drop: [ALL]
    add: {{ include "otel-cuda.capabilities" . }}
  {{- end }}
  runAsUser: 0
  runAsGroup: 0
  readOnlyRootFilesystem: true
  {{- with $v.agent.security.seccompProfile }}
  seccompProfile:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.agent.security.appArmorProfile }}
  appArmorProfile:
    {{- toYaml . | nindent 4 }}
  {{- end }}
volumeMounts:
  - name: otel-cuda-data
    mountPath: /var/lib/otel-cuda
  # Writable scratch on a read-only root: BCC extracts kheaders and caches there.
  - name: otel-cuda-tmp
    mountPath: /tmp
    subPath: tmp
  - name: otel-cuda-tmp
    mountPath: /var/tmp
    subPath: var-tmp
  {{- if $v.agent.hostPaths.kernelHeaders }}
  - name: host-lib-modules
    mountPath: /lib/modules
    readOnly: true
  - name: host-usr-src
    mountPath: /usr/src
    readOnly: true
  {{- end }}
  {{- if $v.agent.hostPaths.tracefs }}
  - name: host-tracefs
    mountPath: /sys/kernel/tracing
    readOnly: {{ not $v.agent.hostPaths.tracefsWritable }}
  {{- end }}
  {{- if $v.agent.hostPaths.debugfs }}
  - name: host-debugfs
    mountPath: /sys/kernel/debug
    readOnly: {{ not $v.agent.hostPaths.tracefsWritable }}
  {{- end }}
  {{- if $daemon }}
  - name: host-cgroup
    mountPath: /sys/fs/cgroup
    readOnly: true
  {{- end }}
{{- end }}

{{/* The volumes the otel-cuda container mounts. */}}
{{- define "otel-cuda.agentVolumes" -}}
{{- $v := .Values -}}
- name: otel-cuda-data
  {{- if eq $v.agent.archive.volume.type "hostPath" }}
  hostPath:
    path: {{ $v.agent.archive.volume.hostPath }}
    type: DirectoryOrCreate
  {{- else if eq $v.agent.archive.volume.type "persistentVolumeClaim" }}
  persistentVolumeClaim:
    claimName: {{ required "agent.archive.volume.claimName is required for type persistentVolumeClaim" $v.agent.archive.volume.claimName }}
  {{- else }}
  emptyDir:
    sizeLimit: {{ $v.agent.archive.volume.sizeLimit }}
  {{- end }}
- name: otel-cuda-tmp
  emptyDir:
    sizeLimit: 256Mi
{{- if $v.agent.hostPaths.kernelHeaders }}
- name: host-lib-modules
  hostPath:
    path: /lib/modules
    type: Directory
- name: host-usr-src
  hostPath:
    path: /usr/src
    type: Directory
{{- end }}
{{- if $v.agent.hostPaths.tracefs }}
- name: host-tracefs
  hostPath:
    path: /sys/kernel/tracing
    type: Directory
{{- end }}
{{- if $v.agent.hostPaths.debugfs }}
- name: host-debugfs
  hostPath:
    path: /sys/kernel/debug
    type: Directory
{{- end }}
{{- if eq $v.mode "daemonset" }}
- name: host-cgroup
  hostPath:
    path: /sys/fs/cgroup
    type: Directory
{{- end }}
{{- end }}

{{/* {a: b, c: d} -> "a=b,c=d" (OTEL_RESOURCE_ATTRIBUTES), in key order. */}}
{{- define "otel-cuda.kvList" -}}
{{- $out := list }}
{{- range $k, $val := . }}
{{- $out = append $out (printf "%s=%v" $k $val) }}
{{- end }}
{{- join "," $out }}
{{- end }}

{{/* Scheduling shared by the GPU pods. */}}
{{- define "otel-cuda.scheduling" -}}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- end }}

{{- define "otel-cuda.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- end }}
