{{- define "vienna-authority.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vienna-authority.fullname" -}}
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

{{- define "vienna-authority.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vienna-authority.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "vienna-authority.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "vienna-authority.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: authority
{{- end }}

{{- define "vienna-authority.postgres" -}}
{{- if .Values.store.postgres.existingSecret }}true{{- end }}
{{- end }}

{{- define "vienna-authority.replicas" -}}
{{- if kindIs "invalid" .Values.replicaCount }}
{{- if include "vienna-authority.postgres" . }}2{{- else }}1{{- end }}
{{- else }}
{{- .Values.replicaCount }}
{{- end }}
{{- end }}

{{- define "vienna-authority.signingKeySecretName" -}}
{{- default (printf "%s-signing-key" (include "vienna-authority.fullname" .)) .Values.signingKey.existingSecret }}
{{- end }}

{{- define "vienna-authority.filesSecretName" -}}
{{- printf "%s-files" (include "vienna-authority.fullname" .) }}
{{- end }}

{{- define "vienna-authority.publicUrl" -}}
{{- default (printf "http://%s.%s.svc:%d" (include "vienna-authority.fullname" .) .Release.Namespace (int .Values.port)) .Values.publicUrl }}
{{- end }}

{{- define "vienna-authority.validate" -}}
{{- if and (not (include "vienna-authority.postgres" .)) (gt (int (include "vienna-authority.replicas" .)) 1) }}
{{- fail "replicaCount > 1 needs store.postgres.existingSecret (a PostgreSQL DSN): SQLite serves one replica" }}
{{- end }}
{{- if and (not .Values.operators.existingSecret) (not .Values.operators.list) }}
{{- fail "give operators.list or operators.existingSecret: without operators nobody can approve" }}
{{- end }}
{{- if and (not .Values.sidecars.existingSecret) (not .Values.sidecars.list) }}
{{- fail "give sidecars.list or sidecars.existingSecret: without sidecars nothing reaches the authority" }}
{{- end }}
{{- end }}
