{{/* Chart name. */}}
{{- define "ppml.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-qualified name; components append -kms, -scheduler, -executor, -submit. */}}
{{- define "ppml.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Selector labels of a component: (dict "root" $ "component" "kms"). */}}
{{- define "ppml.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ppml.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* All labels of a component's objects and pods. */}}
{{- define "ppml.labels" -}}
{{ include "ppml.selectorLabels" . }}
app.kubernetes.io/part-of: ppml
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- if eq .root.Values.executor.tee.kind "sim" }}
ppml.io/environment: development
{{- end }}
{{- end -}}

{{- define "ppml.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The scheduler as HOST:PORT (its Service). */}}
{{- define "ppml.master" -}}
{{ include "ppml.fullname" . }}-scheduler:{{ .Values.scheduler.port }}
{{- end -}}

{{- define "ppml.kmsUrl" -}}
{{- if .Values.kmsClient.url -}}
{{ .Values.kmsClient.url }}
{{- else -}}
https://{{ include "ppml.fullname" . }}-kms:{{ .Values.kms.port }}
{{- end -}}
{{- end -}}

{{/* Checks of the TEE choice, rendered (empty) by every workload. */}}
{{- define "ppml.validate" -}}
{{- $tee := .Values.executor.tee.kind -}}
{{- if not (has $tee (list "tdx" "sgx" "sim")) -}}
{{- fail (printf "executor.tee.kind must be tdx, sgx or sim, not %q" $tee) -}}
{{- end -}}
{{- if and (eq $tee "sim") (not .Values.executor.tee.sim.platformKeySecret) -}}
{{- fail "executor.tee.kind=sim (development only) needs executor.tee.sim.platformKeySecret" -}}
{{- end -}}
{{- $kmsTee := .Values.kms.tee.kind -}}
{{- if not (has $kmsTee (list "none" "tdx" "sgx" "sim")) -}}
{{- fail (printf "kms.tee.kind must be none, tdx, sgx or sim, not %q" $kmsTee) -}}
{{- end -}}
{{- if ne $kmsTee "none" -}}
{{- if .Values.kms.tls.existingSecret -}}
{{- fail "a KMS in a TEE makes its own TLS key at each start: unset kms.tls.existingSecret" -}}
{{- end -}}
{{- if and (eq $kmsTee "sim") (not .Values.kms.tee.sim.platformKeySecret) -}}
{{- fail "kms.tee.kind=sim (development only) needs kms.tee.sim.platformKeySecret" -}}
{{- end -}}
{{- if and .Values.kms.enabled (not .Values.kmsClient.url) (not .Values.kmsClient.kmsPolicy) -}}
{{- fail "a KMS in a TEE is trusted through its quote: set kmsClient.kmsPolicy (docs/attestation.md §8)" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Init container copying the mounted Secrets (/ppml-secrets/NAME/*) to the in-memory volume
/run/ppml (/run/ppml/NAME/*, directories 0700, files 0600 owned by the pod's user): ppml
refuses private key files that the group or others may read, and a Secret volume's files are
group-readable under fsGroup (and unreadable to a non-root user without it). The main
container mounts /run/ppml read-only. No "$(" in the script: Kubernetes expands $(NAME) in
commands.
*/}}
{{- define "ppml.copySecretsInit" -}}
- name: copy-secrets
  image: {{ include "ppml.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command:
    - /bin/sh
    - -ec
    - |
      for dir in /ppml-secrets/*/; do
        name=${dir%/}; name=${name##*/}
        mkdir -m 0700 "/run/ppml/$name"
        for file in "$dir"*; do install -m 0600 "$file" "/run/ppml/$name/"; done
      done
  securityContext:
    {{- toYaml .Values.containerSecurityContext | nindent 4 }}
  resources:
    requests:
      cpu: 10m
      memory: 16Mi
    limits:
      cpu: 100m
      memory: 32Mi
  volumeMounts:
    - name: run-ppml
      mountPath: /run/ppml
    {{- range .mounts }}
    - name: {{ . }}
      mountPath: /ppml-secrets/{{ . }}
      readOnly: true
    {{- end }}
{{- end -}}

{{/* Environment of a KMS client (executors, submit): URL, trust, app credentials, keys. */}}
{{- define "ppml.kmsClientEnv" -}}
- name: PPML_HOME
  value: /var/lib/ppml/home
- name: PPML_KMS_URL
  value: {{ include "ppml.kmsUrl" . | quote }}
{{- with .Values.kmsClient.fingerprint }}
- name: PPML_KMS_FINGERPRINT
  value: {{ . | quote }}
{{- end }}
{{- if .Values.kmsClient.caSecret }}
- name: PPML_KMS_CA_CERT
  value: /run/ppml/kms-ca/{{ .Values.kmsClient.caSecretKey }}
{{- end }}
{{- if .Values.kmsClient.kmsPolicy }}
- name: PPML_KMS_POLICY
  value: /etc/ppml/kms-policy/kms-policy.json
{{- end }}
- name: PPML_APPID
  valueFrom:
    secretKeyRef:
      name: {{ .Values.credentials.existingSecret }}
      key: {{ .Values.credentials.appidKey }}
- name: PPML_APIKEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.credentials.existingSecret }}
      key: {{ .Values.credentials.apikeyKey }}
{{- with .Values.kmsClient.attestationPolicy }}
- name: PPML_ATTESTATION_POLICY
  value: {{ . | quote }}
{{- end }}
{{- with .Values.kmsClient.primaryKey }}
- name: PPML_PRIMARY_KEY
  value: {{ . | quote }}
{{- end }}
{{- with .Values.kmsClient.outputKey }}
- name: PPML_OUTPUT_KEY
  value: {{ . | quote }}
{{- end }}
{{- end -}}

{{/* Prometheus scrape annotations: (dict "root" $ "port" N "scheme" "http"). */}}
{{- define "ppml.scrapeAnnotations" -}}
{{- if .root.Values.metrics.annotations -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
prometheus.io/scheme: {{ .scheme }}
{{- end }}
{{- end -}}
