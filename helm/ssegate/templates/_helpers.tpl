{{/* Names and labels. */}}
{{- define "ssegate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ssegate.fullname" -}}
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

{{- define "ssegate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ssegate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "ssegate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "ssegate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "ssegate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ssegate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* More than one pod at any time (fixed replicas or an autoscaler). */}}
{{- define "ssegate.multiReplica" -}}
{{- if or (gt (int .Values.replicaCount) 1) .Values.autoscaling.enabled }}true{{ end }}
{{- end }}

{{/*
The memory backplane keeps its state in a data dir on a PersistentVolumeClaim: the pod is then
a StatefulSet of one. Persistence is ignored with NATS (the JetStream stream keeps the events;
the server refuses --data-dir there).
*/}}
{{- define "ssegate.persistent" -}}
{{- if and (eq .Values.backplane.type "memory") .Values.persistence.enabled }}true{{ end }}
{{- end }}

{{/* Where the claim is mounted, and the data dir inside it (lost+found stays out). */}}
{{- define "ssegate.dataMountPath" -}}/var/lib/ssegate{{- end }}
{{- define "ssegate.dataDir" -}}/var/lib/ssegate/data{{- end }}

{{- define "ssegate.dataClaimName" -}}
{{- .Values.persistence.existingClaim | default (printf "%s-data" (include "ssegate.fullname" .)) }}
{{- end }}

{{/* terminationGracePeriodSeconds = shutdown delay + shutdown grace + margin. */}}
{{- define "ssegate.terminationGracePeriodSeconds" -}}
{{- add (int .Values.drain.shutdownDelaySeconds) (int .Values.drain.shutdownGraceSeconds) (int .Values.drain.terminationMarginSeconds) }}
{{- end }}

{{/* Mount paths of the referenced Secrets. */}}
{{- define "ssegate.jwtDir" -}}/etc/ssegate/jwt{{- end }}
{{- define "ssegate.apiKeysDir" -}}/etc/ssegate/publisher{{- end }}
{{- define "ssegate.consoleDir" -}}/etc/ssegate/console{{- end }}
{{- define "ssegate.tlsDir" -}}/etc/ssegate/tls{{- end }}
{{- define "ssegate.clientCaDir" -}}/etc/ssegate/client-ca{{- end }}
{{- define "ssegate.natsCredsDir" -}}/etc/ssegate/nats-creds{{- end }}
{{- define "ssegate.natsCaDir" -}}/etc/ssegate/nats-ca{{- end }}

{{/*
Flags of `ssegate serve` that `config:` may set. Everything else is either set by the chart
from dedicated values (managed below) or not a flag. Keep in sync with `ssegate serve --help`
(scripts/helm-check.sh compares them when target/debug/ssegate exists).
*/}}
{{- define "ssegate.configFlags" -}}
nats-subject nats-delivery nats-interest-linger nats-stream-max-age nats-stream-max-bytes nats-duplicate-window nats-cluster-wait nats-publish-timeout heartbeat-interval retry queue-capacity max-queue-bytes write-coalesce replay-capacity replay-max-bytes replay-max-age max-retained max-retained-bytes max-connections max-connections-per-user max-connection-lifetime max-event-bytes max-ids-per-request max-subscriptions grpc-max-message-bytes jwt-leeway token-cookie max-connections-per-ip max-header-bytes header-read-timeout cors-allowed-origins idle-timeout send-timeout max-pending-connections log-format authorizer-addr authorizer-protocol authorizer-header authorizer-cookie authorizer-timeout authorizer-cache-ttl authorizer-cache-size authorizer-max-in-flight authorizer-tls-ca-file presence-grace presence-watcher-queue presence-webhook presence-webhook-batch presence-webhook-delay presence-webhook-timeout presence-webhook-queue
{{- end }}

{{/* Flags the chart sets itself, with the value to use instead. */}}
{{- define "ssegate.managedFlags" -}}
http-addr: ports.http
grpc-addr: ports.grpc
admin-addr: ports.admin
backplane: backplane.type
nats-url: backplane.nats.urls
nats-stream: backplane.nats.stream
nats-stream-replicas: backplane.nats.streamReplicas
nats-partitions: backplane.nats.partitions
nats-creds-file: backplane.nats.credsSecret
nats-tls-ca-file: backplane.nats.tlsCaSecret
jwt-secret-file: jwt.existingSecret + jwt.secretKey
jwt-public-key-file: jwt.existingSecret + jwt.publicKeyKey
jwt-jwks-file: jwt.existingSecret + jwt.jwksKey
jwt-issuer: jwt.issuer
jwt-audience: jwt.audience
publisher-api-keys-file: publisherApiKeys.existingSecret
publisher-api-keys: extraEnv with valueFrom.secretKeyRef (never a secret in values)
console-token-file: console.existingSecret
tls-cert-file: tls.enabled + tls.existingSecret
tls-key-file: tls.enabled + tls.existingSecret
grpc-client-ca-file: tls.clientCa
insecure-dev-identity: dev.insecureDevIdentity
insecure-open-publish: dev.insecureOpenPublish
shutdown-delay: drain.shutdownDelaySeconds
shutdown-grace: drain.shutdownGraceSeconds
data-dir: persistence.enabled (a PersistentVolumeClaim, memory backplane)
data-sync: persistence.sync
{{- end }}

{{/*
Refuses value combinations that would deploy something broken, with a message saying what to
change. Included by the ConfigMap and the workload (Deployment or StatefulSet), so
`helm template`/`install`/`upgrade` fail.
*/}}
{{- define "ssegate.validate" -}}
{{- $v := .Values }}
{{- if and (include "ssegate.multiReplica" .) (ne $v.backplane.type "nats") }}
{{- fail (printf "\n\nssegate: replicaCount=%v%s needs the NATS backplane: with backplane.type=%s each pod only delivers what was published to itself.%s\nSet backplane.type=nats and backplane.nats.urls (an external NATS with JetStream), or use replicaCount=1 without autoscaling.\n" $v.replicaCount (ternary " with autoscaling.enabled" "" (eq (toString $v.autoscaling.enabled) "true")) $v.backplane.type (ternary "\nWith persistence.enabled the pod's data directory (--data-dir) is also for one process only: it is locked, and a second pod on the volume would crash-loop." "" (eq (include "ssegate.persistent" .) "true"))) }}
{{- end }}
{{- if and (eq $v.backplane.type "nats") (empty $v.backplane.nats.urls) }}
{{- fail "\n\nssegate: backplane.type=nats needs backplane.nats.urls (e.g. [nats://nats.nats:4222]).\n" }}
{{- end }}
{{- if and $v.autoscaling.enabled (gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) }}
{{- fail "\n\nssegate: autoscaling.minReplicas is greater than autoscaling.maxReplicas.\n" }}
{{- end }}
{{- $managed := include "ssegate.managedFlags" . | fromYaml }}
{{- $allowed := splitList " " (include "ssegate.configFlags" .) }}
{{- range $k, $_ := $v.config }}
{{- if hasKey $managed $k }}
{{- fail (printf "\n\nssegate: config.%s is set by the chart; use %s instead.\n" $k (get $managed $k)) }}
{{- else if not (has $k $allowed) }}
{{- fail (printf "\n\nssegate: config.%s is not a flag of `ssegate serve` (write flag names without `--`, e.g. max-connections).\n" $k) }}
{{- end }}
{{- end }}
{{- with (get $v.config "cors-allowed-origins") }}
{{- range $origin := splitList "," (toString .) }}
{{- if not (or (eq (trim $origin) "*") (regexMatch "^https?://[^/]+$" (trim $origin))) }}
{{- fail (printf "\n\nssegate: config.cors-allowed-origins: %q is not an origin: an origin is scheme://host[:port] with no path (remove a trailing '/'), or *; a browser sends it exactly so.\n" (trim $origin)) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and $v.jwt.existingSecret (not (or $v.jwt.secretKey $v.jwt.publicKeyKey $v.jwt.jwksKey)) }}
{{- fail "\n\nssegate: jwt.existingSecret is set but none of jwt.secretKey, jwt.publicKeyKey, jwt.jwksKey names a key in it.\n" }}
{{- end }}
{{- if and (not $v.jwt.existingSecret) (or $v.jwt.secretKey $v.jwt.publicKeyKey $v.jwt.jwksKey) }}
{{- fail "\n\nssegate: jwt.secretKey/publicKeyKey/jwksKey name keys of jwt.existingSecret, which is empty.\n" }}
{{- end }}
{{- if and $v.tls.enabled (not $v.tls.existingSecret) }}
{{- fail "\n\nssegate: tls.enabled needs tls.existingSecret (a kubernetes.io/tls Secret, e.g. from cert-manager).\n" }}
{{- end }}
{{- if and $v.tls.clientCa.enabled (not $v.tls.enabled) }}
{{- fail "\n\nssegate: tls.clientCa.enabled (mutual TLS on gRPC) needs tls.enabled.\n" }}
{{- end }}
{{- if and $v.networkPolicy.enabled (empty $v.networkPolicy.grpcFrom) }}
{{- fail "\n\nssegate: networkPolicy.grpcFrom is empty: no publisher could reach the gRPC port. List the allowed peers or set networkPolicy.enabled=false.\n" }}
{{- end }}
{{- end }}

{{/*
Memory the server needs, in MiB (float): memory.baseMiB + replay-max-bytes + max-retained-bytes +
max-connections ×
the memory of one connection (memory.perConnectionKiB, or by protocol when 0: 24 KiB with
tls.enabled, where browsers speak HTTP/2 to the pod; 4 KiB for cleartext HTTP/1.1).
*/}}
{{- define "ssegate.memoryPerConnectionKiB" -}}
{{- $kib := int64 .Values.memory.perConnectionKiB }}
{{- if eq $kib 0 }}{{ $kib = ternary 24 4 (eq (toString .Values.tls.enabled) "true") }}{{ end }}
{{- $kib }}
{{- end }}

{{- define "ssegate.maxConnections" -}}
{{- int64 (default 50000 (get .Values.config "max-connections")) }}
{{- end }}

{{- define "ssegate.replayMaxMiB" -}}
{{- divf (float64 (default 67108864 (get .Values.config "replay-max-bytes"))) 1048576.0 }}
{{- end }}

{{- define "ssegate.retainedMaxMiB" -}}
{{- divf (float64 (default 67108864 (get .Values.config "max-retained-bytes"))) 1048576.0 }}
{{- end }}

{{- define "ssegate.memoryNeedMiB" -}}
{{- $conns := int64 (include "ssegate.maxConnections" .) }}
{{- $kib := int64 (include "ssegate.memoryPerConnectionKiB" .) }}
{{- addf (float64 .Values.memory.baseMiB) (float64 (include "ssegate.replayMaxMiB" .)) (float64 (include "ssegate.retainedMaxMiB" .)) (divf (mul $conns $kib) 1024.0) }}
{{- end }}

{{/* A Kubernetes memory quantity (1Gi, 1500Mi, 2G, 1.5Gi, or bytes) in MiB (float). */}}
{{- define "ssegate.quantityMiB" -}}
{{- if or (kindIs "float64" .) (kindIs "int" .) (kindIs "int64" .) }}
{{- divf (float64 .) 1048576.0 }}
{{- else }}
{{- $q := toString . }}
{{- $num := regexFind "^[0-9]+([.][0-9]+)?" $q }}
{{- $unit := trimPrefix $num $q }}
{{- $mult := dict "" 1.0 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "k" 1000.0 "M" 1000000.0 "G" 1000000000.0 "T" 1000000000000.0 }}
{{- if or (not $num) (not (hasKey $mult $unit)) }}
{{- fail (printf "\n\nssegate: resources.limits.memory=%s is not a memory quantity the chart understands (e.g. 1Gi, 1536Mi, 2G).\n" $q) }}
{{- end }}
{{- divf (mulf (float64 $num) (get $mult $unit)) 1048576.0 }}
{{- end }}
{{- end }}

{{/*
The container resources: `resources` as given, with limits.memory derived from the connection
limit when unset (need × (100 + memory.headroomPercent) / 100), and refused when set below the
need: the pod would be OOM-killed before --max-connections answers 503.
*/}}
{{- define "ssegate.resources" -}}
{{- $r := deepCopy (default (dict) .Values.resources) }}
{{- $limits := default (dict) (get $r "limits") }}
{{- $need := float64 (include "ssegate.memoryNeedMiB" .) }}
{{- if get $limits "memory" }}
{{- $set := float64 (include "ssegate.quantityMiB" (get $limits "memory")) }}
{{- if lt $set $need }}
{{- fail (printf "\n\nssegate: resources.limits.memory=%v (%.0f MiB) is below what the server needs at its connection limit: %.0f MiB = %d MiB base + %.0f MiB replay log + %.0f MiB retained values + %d connections (config.max-connections) × %d KiB.\nRaise resources.limits.memory (or leave it unset: the chart then derives it with %d%% headroom), lower config.max-connections, or set memory.perConnectionKiB to what you measured.\n" (get $limits "memory") $set $need (int64 .Values.memory.baseMiB) (float64 (include "ssegate.replayMaxMiB" .)) (float64 (include "ssegate.retainedMaxMiB" .)) (int64 (include "ssegate.maxConnections" .)) (int64 (include "ssegate.memoryPerConnectionKiB" .)) (int64 .Values.memory.headroomPercent)) }}
{{- end }}
{{- else }}
{{- $limit := ceil (mulf $need (divf (float64 (add 100 (int64 .Values.memory.headroomPercent))) 100.0)) }}
{{- $_ := set $limits "memory" (printf "%dMi" (int64 $limit)) }}
{{- end }}
{{- $_ := set $r "limits" $limits }}
{{- toYaml $r }}
{{- end }}

{{/* Renders one config value as an environment variable string. */}}
{{- define "ssegate.envValue" -}}
{{- if kindIs "float64" . }}{{ int64 . }}{{ else if kindIs "slice" . }}{{ join "," . }}{{ else }}{{ toString . }}{{ end }}
{{- end }}
