{{- define "dedup.name" -}}{{ .Release.Name }}-dedup{{- end }}

{{- define "dedup.labels" -}}
app.kubernetes.io/name: dedup
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- /* The registry every image is pulled from: image.registry, else global.imageRegistry (as
  umbrella charts set it), else none (the references as written). */ -}}
{{- define "dedup.registry" -}}
{{- $global := (.Values.global | default dict).imageRegistry | default "" -}}
{{- with (.Values.image.registry | default $global) }}{{ trimSuffix "/" . }}/{{ end -}}
{{- end }}
{{- define "dedup.image" -}}{{ include "dedup.registry" . }}{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}{{- end }}

{{- define "dedup.secretName" -}}{{ default (printf "%s-urls" (include "dedup.name" .)) .Values.connections.existingSecret }}{{- end }}

{{- define "dedup.hardened" -}}
runAsNonRoot: true
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
{{- end }}

{{- define "dedup.podSecurity" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- /* The Secret with ingest's write key file: the given one, or the chart's. */ -}}
{{- define "dedup.writeKeysSecret" -}}{{ default (printf "%s-write-keys" (include "dedup.name" .)) .Values.pipeline.ingest.writeKeysSecret }}{{- end }}

{{- /* The Secret with the bundled services' passwords: the given one, or the chart's. */ -}}
{{- define "dedup.credentialsSecret" -}}{{ default (printf "%s-credentials" (include "dedup.name" .)) .Values.credentials.existingSecret }}{{- end }}

{{- /* Where pods may run and what they pull with: imagePullSecrets, nodeSelector, tolerations,
  affinity and priorityClassName from the values, for every pod the chart makes (the operator
  gives the pipeline's pods the same, through the DedupPipeline's `pods`). */ -}}
{{- define "dedup.podPlacement" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end }}

{{- /* Redis's maxmemory: redis.maxmemory when given, else 80 % of the container's memory limit
  (Gi, Mi or G, M suffixes), leaving room for Redis's own overhead and forks; recent keys
  beyond it are evicted (maxmemoryPolicy) instead of the pod being OOM-killed. */ -}}
{{- define "dedup.redisMaxmemory" -}}
{{- if .Values.redis.maxmemory -}}
{{ .Values.redis.maxmemory }}
{{- else -}}
{{- $limit := toString (dig "limits" "memory" "" .Values.redis.resources) -}}
{{- $mib := 0 -}}
{{- if hasSuffix "Gi" $limit }}{{ $mib = mul (trimSuffix "Gi" $limit | atoi) 1024 }}
{{- else if hasSuffix "Mi" $limit }}{{ $mib = trimSuffix "Mi" $limit | atoi }}
{{- else if hasSuffix "G" $limit }}{{ $mib = div (mul (trimSuffix "G" $limit | atoi) 1000000000) 1048576 }}
{{- else if hasSuffix "M" $limit }}{{ $mib = div (mul (trimSuffix "M" $limit | atoi) 1000000) 1048576 }}
{{- end -}}
{{- if not $mib }}{{ fail (printf "redis.resources.limits.memory %q: give it in Gi or Mi, or set redis.maxmemory" $limit) }}{{ end -}}
{{ div (mul $mib 4) 5 }}mb
{{- end -}}
{{- end }}
