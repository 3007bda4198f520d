{{/* Labels every object carries, as in the kustomize base. */}}
{{- define "sluice.labels" -}}
app.kubernetes.io/name: sluice
app.kubernetes.io/part-of: sluice
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
{{- end -}}

{{- define "sluice.config.sluice" -}}
{{- .Values.config.sluice | default (.Files.Get "files/sluice.toml") -}}
{{- end -}}

{{- define "sluice.config.routes" -}}
{{- .Values.config.routes | default (.Files.Get "files/routes.toml") -}}
{{- end -}}
