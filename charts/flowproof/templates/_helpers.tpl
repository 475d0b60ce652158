{{/* Labels every object carries (the kustomize base's, plus Helm's own). */}}
{{- define "flowproof.labels" -}}
app.kubernetes.io/name: flowproof
app.kubernetes.io/part-of: flowproof
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* An image reference: registry/repository:tag, or @digest when one is set. */}}
{{- define "flowproof.image" -}}
{{- $root := index . 0 -}}
{{- $image := index . 1 -}}
{{- $name := $image.repository -}}
{{- if $root.Values.image.registry -}}
{{- $name = printf "%s/%s" (trimSuffix "/" $root.Values.image.registry) $image.repository -}}
{{- end -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $name $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $name (default (default $root.Chart.AppVersion $root.Values.image.tag) $image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the token. */}}
{{- define "flowproof.tokenSecret" -}}
{{- default "flowproof-token" .Values.auth.existingSecret -}}
{{- end -}}

{{/* Labels for the Prometheus Operator's objects (the release hook of kube-prometheus-stack). */}}
{{- define "flowproof.monitoringLabels" -}}
{{- if .root.Values.monitoring.release }}
release: {{ .root.Values.monitoring.release | quote }}
{{- end }}
{{- with .extra }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The token and TLS volumes and mounts, the same in both pods. */}}
{{- define "flowproof.tlsSecret" -}}
{{- .Values.tls.existingSecret | default "flowproof-collector-tls" -}}
{{- end -}}
