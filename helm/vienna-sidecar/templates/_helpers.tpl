{{/*
Named templates of the vienna-sidecar chart.

To put the sidecar into a pod spec of your own (a StatefulSet, a Job, another chart), with this
chart as a dependency:

  spec:
    {{- if eq .Values.mode "transparent" }}
    initContainers:
      {{- include "vienna-sidecar.iptablesInit" . | nindent 6 }}
    {{- end }}
    # native sidecar (sidecar.nativeSidecar=true): under initContainers, after the iptables one
    initContainers:
      {{- include "vienna-sidecar.container" . | nindent 6 }}
    containers:
      - name: my-agent
        image: ...
        env:
          {{- include "vienna-sidecar.agentEnv" . | nindent 10 }}
        volumeMounts:
          {{- include "vienna-sidecar.agentVolumeMounts" . | nindent 10 }}
    volumes:
      {{- include "vienna-sidecar.volumes" . | nindent 6 }}

(with sidecar.nativeSidecar=false, "vienna-sidecar.container" goes first under containers.)
The ConfigMap/Secrets it refers to are rendered by this chart's other templates.
*/}}

{{- define "vienna-sidecar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vienna-sidecar.fullname" -}}
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

{{- define "vienna-sidecar.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vienna-sidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vienna-sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "vienna-sidecar.labels" -}}
helm.sh/chart: {{ include "vienna-sidecar.chart" . }}
{{ include "vienna-sidecar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "vienna-sidecar.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "vienna-sidecar.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "vienna-sidecar.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* ---- names of the things the sidecar reads ------------------------------------------------ */}}

{{- define "vienna-sidecar.policyConfigMapName" -}}
{{- default (printf "%s-policy" (include "vienna-sidecar.fullname" .)) .Values.policy.existingConfigMap }}
{{- end }}

{{/* "true" when the sidecar gets a policy file (else it runs its built-in policy). */}}
{{- define "vienna-sidecar.hasPolicy" -}}
{{- if or .Values.policy.existingConfigMap .Values.policy.inline }}true{{ end }}
{{- end }}

{{- define "vienna-sidecar.warrantKeySecretName" -}}
{{- default (printf "%s-warrant-key" (include "vienna-sidecar.fullname" .)) .Values.warrantKey.existingSecret }}
{{- end }}

{{- define "vienna-sidecar.auditKeySecretName" -}}
{{- default (printf "%s-audit-key" (include "vienna-sidecar.fullname" .)) .Values.auditKey.existingSecret }}
{{- end }}

{{- define "vienna-sidecar.operatorsSecretName" -}}
{{- default (printf "%s-operators" (include "vienna-sidecar.fullname" .)) .Values.operators.existingSecret }}
{{- end }}

{{/* "true" when an operators file is mounted (existing Secret or a non-empty list). */}}
{{- define "vienna-sidecar.hasOperators" -}}
{{- if or .Values.operators.existingSecret .Values.operators.list }}true{{ end }}
{{- end }}

{{- define "vienna-sidecar.caBundlePath" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.caBundle.mountPath) .Values.caBundle.fileName }}
{{- end }}

{{- define "vienna-sidecar.proxyURL" -}}
{{- printf "http://127.0.0.1:%d" (int .Values.sidecar.proxyPort) }}
{{- end }}

{{- define "vienna-sidecar.apiURL" -}}
{{- printf "http://127.0.0.1:%d" (int .Values.sidecar.apiPort) }}
{{- end }}

{{/* Fixed paths inside the sidecar container. */}}
{{- define "vienna-sidecar.dataDir" -}}/var/lib/vienna{{- end }}
{{- define "vienna-sidecar.policyDir" -}}/etc/vienna/policy{{- end }}
{{- define "vienna-sidecar.secretsDir" -}}/etc/vienna/secrets{{- end }}
{{- define "vienna-sidecar.upstreamCADir" -}}/etc/vienna/upstream-ca{{- end }}

{{/* Refuse value combinations that would render a pod that does not enforce what it claims. */}}
{{- define "vienna-sidecar.validate" -}}
{{- if eq .Values.mode "transparent" }}
{{- $uid := .Values.agent.securityContext.runAsUser }}
{{- if kindIs "invalid" $uid }}
{{- fail "mode=transparent needs agent.securityContext.runAsUser: the iptables redirect exempts the sidecar's uid, so the agent's uid must be known and different" }}
{{- end }}
{{- if eq (int $uid) (int .Values.sidecar.uid) }}
{{- fail (printf "mode=transparent: agent.securityContext.runAsUser (%d) must differ from sidecar.uid (%d), or the agent's traffic is not redirected" (int $uid) (int .Values.sidecar.uid)) }}
{{- end }}
{{- end }}
{{- if and .Values.authority.url (not .Values.authority.tokenSecret.name) }}
{{- fail "authority.url needs authority.tokenSecret.name: a Secret holding this sidecar's token for the authority" }}
{{- end }}
{{- if and .Values.persistence.enabled (gt (int .Values.replicaCount) 1) }}
{{- fail "persistence.enabled needs replicaCount: 1 (one data dir per sidecar; a ReadWriteOnce claim cannot be shared)" }}
{{- end }}
{{- if not (and .Values.persistence.enabled .Values.persistence.existingClaim) }}
{{- $limitText := ternary .Values.persistence.size .Values.persistence.emptyDirSizeLimit .Values.persistence.enabled | toString }}
{{- $limit := include "vienna-sidecar.bytes" $limitText | int64 }}
{{- range (splitList "," (.Values.audit.retain | toString)) }}
{{- $part := trim . }}
{{- if regexMatch "^[0-9]+(\\.[0-9]+)? ?([KMGT]i?B?|B)?$" $part }}
{{- $size := include "vienna-sidecar.bytes" $part | int64 }}
{{- if gt (mul $size 5) (mul $limit 4) }}
{{- fail (printf "audit.retain keeps up to %s but the data dir holds %s: keep at most 80%% of it (the WAL, state.db and the CA need room), or raise the data dir's size" $part $limitText) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* A Kubernetes quantity or a `vienna` size (1Gi, 1.5Gi, 500M, 768MiB, 1048576) in bytes. */}}
{{- define "vienna-sidecar.bytes" -}}
{{- $text := trim (toString .) }}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $text }}
{{- $unit := trimPrefix $number $text | trim | trimSuffix "B" }}
{{- $units := dict "" 1 "K" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 }}
{{- mulf (float64 $number) (float64 (get $units $unit)) | int64 }}
{{- end }}

{{/*
vienna-sidecar.agentEnv — the environment of the agent container (a YAML list of EnvVar).
Regular mode: HTTP(S)_PROXY (both cases) → the sidecar's proxy port, NO_PROXY for loopback (+ values).
Both modes: SSL_CERT_FILE, REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE, NODE_EXTRA_CA_CERTS → the CA bundle the
sidecar writes, and VIENNA_API_URL → the sidecar's control API.
*/}}
{{- define "vienna-sidecar.agentEnv" -}}
{{- $bundle := include "vienna-sidecar.caBundlePath" . -}}
- name: SSL_CERT_FILE
  value: {{ $bundle | quote }}
- name: REQUESTS_CA_BUNDLE
  value: {{ $bundle | quote }}
- name: CURL_CA_BUNDLE
  value: {{ $bundle | quote }}
- name: NODE_EXTRA_CA_CERTS
  value: {{ $bundle | quote }}
- name: VIENNA_API_URL
  value: {{ include "vienna-sidecar.apiURL" . | quote }}
{{- if ne .Values.mode "transparent" }}
{{- $proxy := include "vienna-sidecar.proxyURL" . }}
{{- $noProxy := concat (list "localhost" "127.0.0.1" "::1") .Values.proxyEnv.noProxy | uniq | join "," }}
- name: HTTP_PROXY
  value: {{ $proxy | quote }}
- name: HTTPS_PROXY
  value: {{ $proxy | quote }}
- name: http_proxy
  value: {{ $proxy | quote }}
- name: https_proxy
  value: {{ $proxy | quote }}
- name: NO_PROXY
  value: {{ $noProxy | quote }}
- name: no_proxy
  value: {{ $noProxy | quote }}
{{- end }}
{{- end }}

{{/* vienna-sidecar.agentVolumeMounts — what the agent mounts of the sidecar's: the CA bundle, read-only. */}}
{{- define "vienna-sidecar.agentVolumeMounts" -}}
- name: vienna-ca-bundle
  mountPath: {{ .Values.caBundle.mountPath }}
  readOnly: true
{{- end }}

{{/*
vienna-sidecar.volumes — the pod volumes the sidecar needs (a YAML list of Volume). Only
"vienna-ca-bundle" is meant for the agent; every other one is mounted in the sidecar alone.
*/}}
{{- define "vienna-sidecar.volumes" -}}
- name: vienna-ca-bundle
  emptyDir:
    medium: Memory
    sizeLimit: 4Mi
- name: vienna-data
{{- if .Values.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ default (printf "%s-data" (include "vienna-sidecar.fullname" .)) .Values.persistence.existingClaim }}
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.persistence.emptyDirSizeLimit }}
{{- end }}
- name: vienna-tmp
  emptyDir:
    sizeLimit: {{ .Values.sidecar.tmpSizeLimit }}
{{- if include "vienna-sidecar.hasPolicy" . }}
- name: vienna-policy
  configMap:
    name: {{ include "vienna-sidecar.policyConfigMapName" . }}
    items:
      - key: {{ .Values.policy.key }}
        path: policy.yaml
{{- end }}
{{- if .Values.injectSecrets.existingSecret }}
- name: vienna-inject-secrets
  secret:
    secretName: {{ .Values.injectSecrets.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- if .Values.authority.url }}
- name: vienna-authority-token
  secret:
    secretName: {{ .Values.authority.tokenSecret.name }}
    defaultMode: 0440
    items:
      - key: {{ .Values.authority.tokenSecret.key }}
        path: token
{{- else }}
- name: vienna-warrant-key
  secret:
    secretName: {{ include "vienna-sidecar.warrantKeySecretName" . }}
    defaultMode: 0440
    items:
      - key: {{ .Values.warrantKey.key }}
        path: warrant.key
{{- end }}
- name: vienna-audit-key
  secret:
    secretName: {{ include "vienna-sidecar.auditKeySecretName" . }}
    defaultMode: 0440
    items:
      - key: {{ .Values.auditKey.key }}
        path: audit.key
{{- if include "vienna-sidecar.hasOperators" . }}
- name: vienna-operators
  secret:
    secretName: {{ include "vienna-sidecar.operatorsSecretName" . }}
    defaultMode: 0440
    items:
      - key: {{ .Values.operators.key }}
        path: operators.yaml
{{- end }}
{{- if .Values.upstreamCA.existingConfigMap }}
- name: vienna-upstream-ca
  configMap:
    name: {{ .Values.upstreamCA.existingConfigMap }}
    items:
      - key: {{ .Values.upstreamCA.key }}
        path: ca.crt
{{- end }}
{{- if eq .Values.mode "transparent" }}
- name: vienna-iptables-run
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
{{- end }}
{{- end }}

{{/*
vienna-sidecar.container — the sidecar container (one YAML list item). With sidecar.nativeSidecar it
carries restartPolicy: Always and belongs under initContainers; otherwise first under containers.
Configuration goes through VIENNA_* variables (each `vienna run` flag has one), which override the
image's defaults.
*/}}
{{- define "vienna-sidecar.container" -}}
{{- $secrets := include "vienna-sidecar.secretsDir" . -}}
- name: vienna-sidecar
  image: {{ include "vienna-sidecar.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if .Values.sidecar.nativeSidecar }}
  restartPolicy: Always
  {{- end }}
  args:
    - run
    {{- range .Values.sidecar.extraArgs }}
    - {{ . | quote }}
    {{- end }}
  env:
    - name: VIENNA_LISTEN
      value: {{ printf "%s:%d" .Values.sidecar.proxyListenHost (int .Values.sidecar.proxyPort) | quote }}
    - name: VIENNA_API
      value: {{ printf "0.0.0.0:%d" (int .Values.sidecar.apiPort) | quote }}
    - name: VIENNA_MODE
      value: {{ .Values.mode | quote }}
    - name: VIENNA_ENFORCEMENT
      value: {{ .Values.enforcement | quote }}
    - name: VIENNA_AGENT_ID
      {{- if .Values.sidecar.agentId }}
      value: {{ .Values.sidecar.agentId | quote }}
      {{- else }}
      valueFrom:
        fieldRef:
          fieldPath: metadata.name
      {{- end }}
    - name: VIENNA_DATA_DIR
      value: {{ include "vienna-sidecar.dataDir" . | quote }}
    - name: VIENNA_CA_BUNDLE_OUT
      value: {{ include "vienna-sidecar.caBundlePath" . | quote }}
    {{- if include "vienna-sidecar.hasPolicy" . }}
    - name: VIENNA_POLICY
      value: {{ printf "%s/policy.yaml" (include "vienna-sidecar.policyDir" .) | quote }}
    {{- end }}
    {{- if .Values.injectSecrets.existingSecret }}
    - name: VIENNA_SECRETS_DIR
      value: {{ printf "%s/inject" $secrets | quote }}
    {{- end }}
    {{- if .Values.authority.url }}
    - name: VIENNA_AUTHORITY
      value: {{ .Values.authority.url | quote }}
    - name: VIENNA_AUTHORITY_TOKEN_FILE
      value: {{ printf "%s/authority-token/token" $secrets | quote }}
    {{- else }}
    - name: VIENNA_WARRANT_KEY_FILE
      value: {{ printf "%s/warrant-key/warrant.key" $secrets | quote }}
    {{- end }}
    - name: VIENNA_AUDIT_KEY_FILE
      value: {{ printf "%s/audit-key/audit.key" $secrets | quote }}
    {{- if include "vienna-sidecar.hasOperators" . }}
    - name: VIENNA_OPERATORS
      value: {{ printf "%s/operators/operators.yaml" $secrets | quote }}
    {{- end }}
    {{- if .Values.upstreamCA.existingConfigMap }}
    - name: VIENNA_UPSTREAM_CA_FILE
      value: {{ printf "%s/ca.crt" (include "vienna-sidecar.upstreamCADir" .) | quote }}
    {{- end }}
    {{- if not (kindIs "invalid" .Values.sidecar.maxBodyBytes) }}
    - name: VIENNA_MAX_BODY_BYTES
      value: {{ .Values.sidecar.maxBodyBytes | int64 | toString | quote }}
    {{- end }}
    {{- if .Values.sidecar.publicApiUrl }}
    - name: VIENNA_PUBLIC_API_URL
      value: {{ .Values.sidecar.publicApiUrl | quote }}
    {{- end }}
    {{- if .Values.audit.retain }}
    - name: VIENNA_AUDIT_RETAIN
      value: {{ .Values.audit.retain | quote }}
    {{- end }}
    {{- if ne (toString .Values.audit.minFree) "auto" }}
    - name: VIENNA_AUDIT_MIN_FREE
      value: {{ .Values.audit.minFree | toString | quote }}
    {{- end }}
    {{- with .Values.sidecar.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: api
      containerPort: {{ .Values.sidecar.apiPort }}
      protocol: TCP
  startupProbe:
    httpGet:
      path: /startupz
      port: {{ .Values.sidecar.apiPort }}
    periodSeconds: {{ .Values.sidecar.startupProbe.periodSeconds }}
    failureThreshold: {{ .Values.sidecar.startupProbe.failureThreshold }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: {{ .Values.sidecar.apiPort }}
    periodSeconds: {{ .Values.sidecar.livenessProbe.periodSeconds }}
    timeoutSeconds: {{ .Values.sidecar.livenessProbe.timeoutSeconds }}
    failureThreshold: {{ .Values.sidecar.livenessProbe.failureThreshold }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: {{ .Values.sidecar.apiPort }}
    periodSeconds: {{ .Values.sidecar.readinessProbe.periodSeconds }}
    timeoutSeconds: {{ .Values.sidecar.readinessProbe.timeoutSeconds }}
    failureThreshold: {{ .Values.sidecar.readinessProbe.failureThreshold }}
  {{- if not .Values.sidecar.nativeSidecar }}
  lifecycle:
    postStart:
      # Kubernetes starts a pod's containers one after another and waits for each postStart hook:
      # holding here until /startupz answers keeps the agent from starting before the CA bundle
      # exists and the proxy listens (a full audit does not hold it: requests are refused, and
      # the pod is NotReady, until events are exported or shipped).
      exec:
        command:
          - python
          - -c
          - |
            import time, urllib.request
            for _ in range({{ mul (int .Values.sidecar.startupProbe.failureThreshold) (int .Values.sidecar.startupProbe.periodSeconds) 2 }}):
                try:
                    urllib.request.urlopen("http://127.0.0.1:{{ .Values.sidecar.apiPort }}/startupz", timeout=1)
                    break
                except Exception:
                    time.sleep(0.5)
  {{- end }}
  {{- with .Values.sidecar.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    runAsNonRoot: true
    runAsUser: {{ .Values.sidecar.uid }}
    runAsGroup: {{ .Values.sidecar.uid }}
    readOnlyRootFilesystem: true
    allowPrivilegeEscalation: false
    privileged: false
    capabilities:
      drop: ["ALL"]
    seccompProfile:
      type: RuntimeDefault
  volumeMounts:
    - name: vienna-data
      mountPath: {{ include "vienna-sidecar.dataDir" . }}
    - name: vienna-tmp
      mountPath: /tmp
    - name: vienna-ca-bundle
      mountPath: {{ .Values.caBundle.mountPath }}
    {{- if include "vienna-sidecar.hasPolicy" . }}
    - name: vienna-policy
      mountPath: {{ include "vienna-sidecar.policyDir" . }}
      readOnly: true
    {{- end }}
    {{- if .Values.injectSecrets.existingSecret }}
    - name: vienna-inject-secrets
      mountPath: {{ printf "%s/inject" $secrets }}
      readOnly: true
    {{- end }}
    {{- if .Values.authority.url }}
    - name: vienna-authority-token
      mountPath: {{ printf "%s/authority-token" $secrets }}
      readOnly: true
    {{- else }}
    - name: vienna-warrant-key
      mountPath: {{ printf "%s/warrant-key" $secrets }}
      readOnly: true
    {{- end }}
    - name: vienna-audit-key
      mountPath: {{ printf "%s/audit-key" $secrets }}
      readOnly: true
    {{- if include "vienna-sidecar.hasOperators" . }}
    - name: vienna-operators
      mountPath: {{ printf "%s/operators" $secrets }}
      readOnly: true
    {{- end }}
    {{- if .Values.upstreamCA.existingConfigMap }}
    - name: vienna-upstream-ca
      mountPath: {{ include "vienna-sidecar.upstreamCADir" . }}
      readOnly: true
    {{- end }}
{{- end }}

{{/*
vienna-sidecar.iptablesInit — transparent mode's init container (one YAML list item): the only
container with NET_ADMIN/NET_RAW. It redirects tcp to the transparent ports from every uid except the
sidecar's to the sidecar's proxy port (loopback and excluded CIDRs untouched), rejects udp to those
ports (HTTP/3 → falls back to TCP) and, with IPv6 present, rejects IPv6 tcp/udp to them. Idempotent:
its own chains are flushed and refilled when it runs again.
*/}}
{{- define "vienna-sidecar.iptablesInit" -}}
{{- $uid := int .Values.sidecar.uid -}}
{{- $ports := .Values.transparent.ports | join "," -}}
- name: vienna-iptables
  image: {{ .Values.transparent.init.image | quote }}
  imagePullPolicy: {{ .Values.transparent.init.imagePullPolicy }}
  command: ["/bin/sh", "-ec"]
  args:
    - |
      iptables -t nat -N VIENNA_OUTPUT 2>/dev/null || iptables -t nat -F VIENNA_OUTPUT
      iptables -t nat -A VIENNA_OUTPUT -d 127.0.0.0/8 -j RETURN
      {{- range .Values.transparent.excludeCIDRs }}
      iptables -t nat -A VIENNA_OUTPUT -d {{ . }} -j RETURN
      {{- end }}
      iptables -t nat -A VIENNA_OUTPUT -p tcp -m multiport --dports {{ $ports }} -m owner ! --uid-owner {{ $uid }} -j REDIRECT --to-ports {{ .Values.sidecar.proxyPort }}
      iptables -t nat -C OUTPUT -j VIENNA_OUTPUT 2>/dev/null || iptables -t nat -A OUTPUT -j VIENNA_OUTPUT
      iptables -N VIENNA_FILTER 2>/dev/null || iptables -F VIENNA_FILTER
      iptables -A VIENNA_FILTER -p udp -m multiport --dports {{ $ports }} -m owner ! --uid-owner {{ $uid }} -j REJECT
      iptables -C OUTPUT -j VIENNA_FILTER 2>/dev/null || iptables -A OUTPUT -j VIENNA_FILTER
      {{- if .Values.transparent.rejectIPv6 }}
      if grep -qs . /proc/net/if_inet6; then
        ip6tables -N VIENNA_FILTER 2>/dev/null || ip6tables -F VIENNA_FILTER
        ip6tables -A VIENNA_FILTER -d ::1/128 -j RETURN
        ip6tables -A VIENNA_FILTER -p tcp -m multiport --dports {{ $ports }} -m owner ! --uid-owner {{ $uid }} -j REJECT --reject-with tcp-reset
        ip6tables -A VIENNA_FILTER -p udp -m multiport --dports {{ $ports }} -m owner ! --uid-owner {{ $uid }} -j REJECT
        ip6tables -C OUTPUT -j VIENNA_FILTER 2>/dev/null || ip6tables -A OUTPUT -j VIENNA_FILTER
      fi
      {{- end }}
      iptables -t nat -S VIENNA_OUTPUT
  {{- with .Values.transparent.init.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    # iptables needs root in the pod's network namespace, plus these two capabilities, nothing else.
    runAsNonRoot: false
    runAsUser: 0
    runAsGroup: 0
    privileged: false
    allowPrivilegeEscalation: false
    # The image's iptables wrapper picks the legacy/nft backend on first run by rewriting symlinks.
    readOnlyRootFilesystem: false
    capabilities:
      drop: ["ALL"]
      add: ["NET_ADMIN", "NET_RAW"]
    seccompProfile:
      type: RuntimeDefault
  volumeMounts:
    - name: vienna-iptables-run
      mountPath: /run
{{- end }}
