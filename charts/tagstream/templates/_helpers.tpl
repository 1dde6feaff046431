{{- define "tagstream.name" -}}
tagstream-operator
{{- end }}

{{- define "tagstream.labels" -}}
app.kubernetes.io/name: tagstream-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "tagstream.selector" -}}
app.kubernetes.io/name: tagstream-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tagstream.fullname" -}}
{{- if eq .Release.Name "tagstream" -}}
tagstream-operator
{{- else -}}
{{ printf "%s-tagstream-operator" .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end -}}
{{- end }}
