{{/*
The pod template shared by the Deployment (backplane nats, or memory without persistence) and
the StatefulSet (memory backplane with persistence): everything below `template:`.
*/}}
{{- define "ssegate.podTemplate" -}}
{{- $v := .Values }}
{{- $nats := eq $v.backplane.type "nats" }}
{{- $persistent := include "ssegate.persistent" . }}
{{- $anyVolume := or $persistent $v.jwt.existingSecret $v.publisherApiKeys.existingSecret $v.console.existingSecret $v.tls.enabled (and $nats $v.backplane.nats.credsSecret) (and $nats $v.backplane.nats.tlsCaSecret) -}}
metadata:
  annotations:
    # Rolls the pods when the configuration changes. Secrets are not hashed: the API keys
    # file and TLS files are re-read by the server within 2 s of a change.
    checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
    {{- with $v.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  labels:
    {{- include "ssegate.selectorLabels" . | nindent 4 }}
    {{- with $v.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "ssegate.serviceAccountName" . }}
  # ssegate calls no Kubernetes API.
  automountServiceAccountToken: false
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  securityContext:
    {{- toYaml $v.podSecurityContext | nindent 4 }}
  # On SIGTERM the server itself turns /readyz 503 and keeps serving for
  # drain.shutdownDelaySeconds (so no preStop sleep is needed), then drains its streams
  # within drain.shutdownGraceSeconds. The kubelet waits delay + grace + margin before
  # SIGKILL.
  terminationGracePeriodSeconds: {{ include "ssegate.terminationGracePeriodSeconds" . }}
  containers:
    - name: ssegate
      image: "{{ $v.image.repository }}:{{ $v.image.tag | default .Chart.AppVersion }}"
      imagePullPolicy: {{ $v.image.pullPolicy }}
      args: [serve]
      envFrom:
        - configMapRef:
            name: {{ include "ssegate.fullname" . }}
      {{- with $v.extraEnv }}
      env:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      ports:
        - name: http
          containerPort: {{ $v.ports.http }}
          protocol: TCP
        - name: grpc
          containerPort: {{ $v.ports.grpc }}
          protocol: TCP
        - name: admin
          containerPort: {{ $v.ports.admin }}
          protocol: TCP
      startupProbe:
        httpGet:
          path: /readyz
          port: admin
        periodSeconds: {{ $v.probes.startup.periodSeconds }}
        failureThreshold: {{ $v.probes.startup.failureThreshold }}
      livenessProbe:
        httpGet:
          path: /healthz
          port: admin
        periodSeconds: {{ $v.probes.liveness.periodSeconds }}
        failureThreshold: {{ $v.probes.liveness.failureThreshold }}
      readinessProbe:
        httpGet:
          path: /readyz
          port: admin
        periodSeconds: {{ $v.probes.readiness.periodSeconds }}
        failureThreshold: {{ $v.probes.readiness.failureThreshold }}
      resources:
        {{- include "ssegate.resources" . | nindent 8 }}
      securityContext:
        {{- toYaml $v.securityContext | nindent 8 }}
      {{- if $anyVolume }}
      volumeMounts:
        {{- if $persistent }}
        # The data directory (`--data-dir`, SSEGATE_DATA_DIR in the ConfigMap) is a directory
        # inside the volume, so the filesystem's own entries (lost+found) stay out of it.
        - name: data
          mountPath: {{ include "ssegate.dataMountPath" . }}
        {{- end }}
        {{- if $v.jwt.existingSecret }}
        - name: jwt
          mountPath: {{ include "ssegate.jwtDir" . }}
          readOnly: true
        {{- end }}
        {{- if $v.publisherApiKeys.existingSecret }}
        # A directory mount (not subPath): Secret updates reach the file, and the server
        # re-reads it within 2 s.
        - name: publisher-api-keys
          mountPath: {{ include "ssegate.apiKeysDir" . }}
          readOnly: true
        {{- end }}
        {{- if $v.console.existingSecret }}
        # The admin console's token file: a directory mount too, so rotations reach it.
        - name: console-token
          mountPath: {{ include "ssegate.consoleDir" . }}
          readOnly: true
        {{- end }}
        {{- if $v.tls.enabled }}
        - name: tls
          mountPath: {{ include "ssegate.tlsDir" . }}
          readOnly: true
        {{- if $v.tls.clientCa.enabled }}
        - name: client-ca
          mountPath: {{ include "ssegate.clientCaDir" . }}
          readOnly: true
        {{- end }}
        {{- end }}
        {{- if and (eq $v.backplane.type "nats") $v.backplane.nats.credsSecret }}
        - name: nats-creds
          mountPath: {{ include "ssegate.natsCredsDir" . }}
          readOnly: true
        {{- end }}
        {{- if and (eq $v.backplane.type "nats") $v.backplane.nats.tlsCaSecret }}
        - name: nats-ca
          mountPath: {{ include "ssegate.natsCaDir" . }}
          readOnly: true
        {{- end }}
      {{- end }}
  {{- if $anyVolume }}
  volumes:
    {{- if $persistent }}
    # One pod at a time uses this claim: the StatefulSet never starts the replacement of its
    # pod before the old one is gone (see helm/ssegate/README.md, Persistence).
    - name: data
      persistentVolumeClaim:
        claimName: {{ include "ssegate.dataClaimName" . }}
    {{- end }}
    # Secret files readable by the pod's group (fsGroup) only.
    {{- if $v.jwt.existingSecret }}
    - name: jwt
      secret:
        secretName: {{ $v.jwt.existingSecret }}
        defaultMode: 0440
    {{- end }}
    {{- if $v.publisherApiKeys.existingSecret }}
    - name: publisher-api-keys
      secret:
        secretName: {{ $v.publisherApiKeys.existingSecret }}
        defaultMode: 0440
    {{- end }}
    {{- if $v.console.existingSecret }}
    - name: console-token
      secret:
        secretName: {{ $v.console.existingSecret }}
        defaultMode: 0440
    {{- end }}
    {{- if $v.tls.enabled }}
    - name: tls
      secret:
        secretName: {{ $v.tls.existingSecret }}
        defaultMode: 0440
    {{- if $v.tls.clientCa.enabled }}
    - name: client-ca
      secret:
        secretName: {{ $v.tls.clientCa.existingSecret | default $v.tls.existingSecret }}
        defaultMode: 0440
    {{- end }}
    {{- end }}
    {{- if and (eq $v.backplane.type "nats") $v.backplane.nats.credsSecret }}
    - name: nats-creds
      secret:
        secretName: {{ $v.backplane.nats.credsSecret }}
        defaultMode: 0440
    {{- end }}
    {{- if and (eq $v.backplane.type "nats") $v.backplane.nats.tlsCaSecret }}
    - name: nats-ca
      secret:
        secretName: {{ $v.backplane.nats.tlsCaSecret }}
        defaultMode: 0440
    {{- end }}
  {{- end }}
  {{- with $v.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  topologySpreadConstraints:
    {{- if $v.topologySpreadConstraints }}
    {{- toYaml $v.topologySpreadConstraints | nindent 4 }}
    {{- else }}
    - maxSkew: 1
      topologyKey: kubernetes.io/hostname
      whenUnsatisfiable: ScheduleAnyway
      labelSelector:
        matchLabels:
          {{- include "ssegate.selectorLabels" . | nindent 10 }}
    {{- end }}
{{- end }}
