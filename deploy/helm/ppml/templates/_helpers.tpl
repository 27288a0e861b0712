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
{{- if has .root.Values.executor.tee.kind (list "sim" "none") }}
ppml.io/environment: development
{{- end }}
{{- end -}}

{{- define "ppml.image" -}}
{{- if .Values.image.reference -}}
{{ .Values.image.reference }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
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
{{- if not (has $tee (list "tdx" "sgx" "sim" "none")) -}}
{{- fail (printf "executor.tee.kind must be tdx, sgx, sim or none, not %q" $tee) -}}
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
{{- if .Values.kmsClient.attestationPolicy }}
- name: PPML_ATTESTATION_POLICY
  value: {{ .Values.kmsClient.attestationPolicy | quote }}
{{- else if .Values.credentials.attestationPolicyKey }}
- name: PPML_ATTESTATION_POLICY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.credentials.existingSecret }}
      key: {{ .Values.credentials.attestationPolicyKey }}
      optional: true
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

{{/*
BigDL PPML's chart values (bigdl-ppml-helm), applied onto the chart's own so that a BigDL
values file installs as it is (docs/migrating-from-bigdl.md §7). It writes .Values in place,
the same way however often it runs, so each template includes it first, in whatever order
Helm renders them. Values with no meaning in ppml are listed by NOTES ("ppml.bigdlNotes"),
never dropped unseen; values ppml cannot honour make the chart fail with the reason.
*/}}
{{- define "ppml.bigdl" -}}
{{- if kindIs "string" $.Values.image -}}
{{- $_ := set $.Values "image" (dict "reference" $.Values.image "repository" "" "tag" "" "pullPolicy" "IfNotPresent") -}}
{{- end -}}
{{- if and (include "ppml.bigdlInUse" $) (eq $.Values.credentials.existingSecret "ppml-app-credentials") -}}
{{- $_ := set $.Values "credentials" (dict "existingSecret" "kms-secret" "appidKey" "app_id" "apikeyKey" "app_key" "attestationPolicyKey" "policy_id") -}}
{{- end -}}
{{- with $.Values.k8sMaster -}}
{{- if not (hasPrefix "k8s://" .) -}}
{{- fail (printf "k8sMaster %q: BigDL's k8s://https://HOST:PORT (the chart installs into the cluster helm talks to)" .) -}}
{{- end -}}
{{- end -}}
{{- with $.Values.pvc -}}
{{- $_ := set $.Values.data "existingClaim" . -}}
{{- end -}}
{{- with $.Values.kmsURL -}}
{{- if not (hasPrefix "https://" .) -}}
{{- fail (printf "kmsURL %q: ppml sends app credentials only over TLS; use https://HOST:PORT (eHSM serves https)" .) -}}
{{- end -}}
{{- $_ := set $.Values.kmsClient "url" . -}}
{{- $_ := set $.Values.kms "enabled" false -}}
{{- end -}}
{{- with $.Values.deployMode -}}
{{- if not (has . (list "client" "cluster")) -}}
{{- fail (printf "deployMode %q: client or cluster" .) -}}
{{- end -}}
{{- end -}}
{{- with include "ppml.bigdlText" $.Values.sgx | lower -}}
{{- if eq . "true" -}}
{{- $_ := set $.Values.executor.tee "kind" "sgx" -}}
{{- else if eq . "false" -}}
{{- $_ := set $.Values.executor.tee "kind" "none" -}}
{{- else -}}
{{- fail (printf "sgx %q: \"true\" or \"false\"" .) -}}
{{- end -}}
{{- end -}}
{{- with include "ppml.bigdlText" $.Values.executorInstances -}}
{{- if not (regexMatch "^[1-9][0-9]*$" .) -}}
{{- fail (printf "executorInstances %q: a number of executors" .) -}}
{{- end -}}
{{- $_ := set $.Values.executor "replicas" (atoi .) -}}
{{- $_ := set $.Values.submit "numExecutors" (atoi .) -}}
{{- end -}}
{{- $resources := $.Values.executor.resources -}}
{{- $_ := set $resources "requests" (default dict $resources.requests) -}}
{{- $_ := set $resources "limits" (default dict $resources.limits) -}}
{{- with include "ppml.bigdlText" $.Values.executorCores -}}
{{- if not (regexMatch "^[1-9][0-9]*$" .) -}}
{{- fail (printf "executorCores %q: a number of cores" .) -}}
{{- end -}}
{{- $_ := set $.Values.executor "cores" (atoi .) -}}
{{- $_ := set $resources.requests "cpu" . -}}
{{- $_ := set $resources.limits "cpu" . -}}
{{- end -}}
{{- with include "ppml.bigdlText" $.Values.executorMem -}}
{{- $mib := include "ppml.bigdlMiB" (dict "what" "executorMem" "size" .) | atoi -}}
{{- $_ := set $.Values.executor "memory" (printf "%dm" $mib) -}}
{{- /* The pod holds the engine's memory and an overhead sized as Spark sizes an executor
pod's (spark.executor.memoryOverhead: 10%, at least 384 MiB). */ -}}
{{- $pod := printf "%dMi" (add $mib (max 384 (div $mib 10))) -}}
{{- $_ := set $resources.requests "memory" $pod -}}
{{- $_ := set $resources.limits "memory" $pod -}}
{{- end -}}
{{- with include "ppml.bigdlText" $.Values.driverMem -}}
{{- $mib := include "ppml.bigdlMiB" (dict "what" "driverMem" "size" .) | atoi -}}
{{- $_ := set $.Values.submit "driverMemory" (printf "%dm" $mib) -}}
{{- end -}}
{{- with $.Values.name -}}
{{- $_ := set $.Values.submit "name" . -}}
{{- end -}}
{{- with $.Values.class -}}
{{- if not (has . (list "com.intel.analytics.bigdl.ppml.examples.SimpleQuerySparkExample" "com.intel.analytics.bigdl.ppml.examples.SimpleQueryExample")) -}}
{{- fail (printf "class %q: ppml runs BigDL's SimpleQuery (com.intel.analytics.bigdl.ppml.examples.SimpleQuerySparkExample); write other applications as SQL (submit.app=query)" .) -}}
{{- end -}}
{{- $_ := set $.Values.submit "enabled" true -}}
{{- $_ := set $.Values.submit "app" "simple-query" -}}
{{- end -}}
{{- end -}}

{{/* A BigDL value as text: BigDL quotes numbers and booleans ("2", "true"), users may not. */}}
{{- define "ppml.bigdlText" -}}
{{- if not (kindIs "invalid" .) }}{{ toString . }}{{ end -}}
{{- end -}}

{{/* Non-empty when any of BigDL's chart values is set. */}}
{{- define "ppml.bigdlInUse" -}}
{{- range $name := list "k8sMaster" "jar" "class" "name" "pvc" "kmsURL" "deployMode" "driverCores" "driverMem" "executorCores" "executorMem" "executorInstances" "sgx" "sgxLog" "sgxDriverMem" "sgxDriverJvmMem" "sgxExecutorMem" "sgxExecutorJvmMem" "entrypoint" -}}
{{- if include "ppml.bigdlText" (index $.Values $name) }}{{ $name }} {{ end -}}
{{- end -}}
{{- end -}}

{{/* A Spark memory size (512m, 4g, 4Gi) in MiB: (dict "what" NAME "size" TEXT). */}}
{{- define "ppml.bigdlMiB" -}}
{{- $parts := regexFindAll "^([0-9]+)([kKmMgGtT]?)(i?[bB]?)$" (toString .size) 1 -}}
{{- if not $parts -}}
{{- fail (printf "%s %q: a memory size such as 512m or 4g" .what (toString .size)) -}}
{{- end -}}
{{- $number := regexFind "^[0-9]+" (toString .size) | atoi -}}
{{- $unit := regexReplaceAll "^[0-9]+" (toString .size) "" | lower | trunc 1 -}}
{{- $mib := 0 -}}
{{- if eq $unit "t" }}{{ $mib = mul $number 1048576 }}
{{- else if eq $unit "g" }}{{ $mib = mul $number 1024 }}
{{- else if eq $unit "m" }}{{ $mib = $number }}
{{- else if eq $unit "k" }}{{ $mib = div $number 1024 }}
{{- else }}{{ $mib = div $number 1048576 }}
{{- end -}}
{{- if lt $mib 1 -}}
{{- fail (printf "%s %q: less than 1 MiB" .what (toString .size)) -}}
{{- end -}}
{{- $mib -}}
{{- end -}}

{{/* What each BigDL value set became, one line each, for NOTES. */}}
{{- define "ppml.bigdlNotes" -}}
{{- $v := .Values -}}
{{- $lines := list -}}
{{- with $v.image.reference }}{{ $lines = append $lines (printf "image %s -> image.reference (every pod)" .) }}{{ end -}}
{{- with $v.k8sMaster }}{{ $lines = append $lines (printf "k8sMaster %s -> not used: the release is in the cluster helm installed it into" .) }}{{ end -}}
{{- with $v.jar }}{{ $lines = append $lines (printf "jar %s -> not used: SimpleQuery is built into ppml" .) }}{{ end -}}
{{- with $v.class }}{{ $lines = append $lines (printf "class %s -> submit.app simple-query (the submit Job %s): input submit.simpleQuery.input %s, output submit.simpleQuery.output %s" . $v.submit.jobName $v.submit.simpleQuery.input $v.submit.simpleQuery.output) }}{{ end -}}
{{- with $v.name }}{{ $lines = append $lines (printf "name %s -> submit.name (ppml submit --name)" .) }}{{ end -}}
{{- with $v.pvc }}{{ $lines = append $lines (printf "pvc %s -> data.existingClaim, mounted at %s" . $v.data.mountPath) }}{{ end -}}
{{- with $v.kmsURL }}{{ $lines = append $lines (printf "kmsURL %s -> kmsClient.url; the release deploys no KMS" .) }}{{ end -}}
{{- with $v.deployMode }}{{ $lines = append $lines (printf "deployMode %s -> ppml's cluster mode: the driver runs on an attested executor, the submit Job holds no keys" .) }}{{ end -}}
{{- with include "ppml.bigdlText" $v.driverCores }}{{ $lines = append $lines (printf "driverCores %s -> not used: the driver is a task on an executor" .) }}{{ end -}}
{{- with include "ppml.bigdlText" $v.driverMem }}{{ $lines = append $lines (printf "driverMem %s -> submit.driverMemory %s" . $v.submit.driverMemory) }}{{ end -}}
{{- with include "ppml.bigdlText" $v.executorCores }}{{ $lines = append $lines (printf "executorCores %s -> executor.cores, executor cpu %s" . .) }}{{ end -}}
{{- with include "ppml.bigdlText" $v.executorMem }}{{ $lines = append $lines (printf "executorMem %s -> executor.memory %s, executor pod memory %s" . $v.executor.memory $v.executor.resources.limits.memory) }}{{ end -}}
{{- with include "ppml.bigdlText" $v.executorInstances }}{{ $lines = append $lines (printf "executorInstances %s -> executor.replicas, submit.numExecutors" .) }}{{ end -}}
{{- with include "ppml.bigdlText" $v.sgx }}{{ $lines = append $lines (printf "sgx %s -> executor.tee.kind %s" . $v.executor.tee.kind) }}{{ end -}}
{{- range $name := list "sgxLog" "sgxDriverMem" "sgxDriverJvmMem" "sgxExecutorMem" "sgxExecutorJvmMem" -}}
{{- with include "ppml.bigdlText" (index $v $name) }}{{ $lines = append $lines (printf "%s %s -> not used: ppml runs no JVM, and Gramine's log level and enclave size are in its signed manifest (deploy/gramine)" $name .) }}{{ end -}}
{{- end -}}
{{- with $v.entrypoint }}{{ $lines = append $lines "entrypoint -> not used: the submit Job runs ppml submit with the values above" }}{{ end -}}
{{- if include "ppml.bigdlInUse" . }}{{ $lines = append $lines (printf "app credentials -> Secret %s, keys %s, %s%s" $v.credentials.existingSecret $v.credentials.appidKey $v.credentials.apikeyKey (ternary (printf ", %s (attestation policy id)" $v.credentials.attestationPolicyKey) "" (ne $v.credentials.attestationPolicyKey ""))) }}{{ end -}}
{{- range $lines }}
  {{ . }}
{{- end -}}
{{- end -}}
