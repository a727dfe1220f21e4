{{/*
Names. Kubernetes names are DNS labels: at most 63 characters.
*/}}
{{- define "tokenlb.name" -}}
{{- .Values.nameOverride | default .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The prefix of every object's name: the release's name, followed by the
chart's unless the release's name already starts with it. */}}
{{- define "tokenlb.fullname" -}}
{{- $name := include "tokenlb.name" . -}}
{{- $full := printf "%s-%s" .Release.Name $name -}}
{{- if .Values.fullnameOverride -}}
{{- $full = .Values.fullnameOverride -}}
{{- else if hasPrefix $name .Release.Name -}}
{{- $full = .Release.Name -}}
{{- end -}}
{{- $full | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* A name with a suffix, the suffix kept whole within 63 characters. */}}
{{- define "tokenlb.suffixed" -}}
{{- $root := index . 0 -}}
{{- $suffix := index . 1 -}}
{{- printf "%s-%s" (include "tokenlb.fullname" $root | trunc (int (sub 62 (len $suffix))) | trimSuffix "-") $suffix -}}
{{- end -}}

{{/* The InferencePool tokenlb follows. */}}
{{- define "tokenlb.poolName" -}}
{{- .Values.inferencePool.name | default (include "tokenlb.fullname" .) -}}
{{- end -}}

{{/* Standalone mode: the Service in front of tokenlb's admin port (the
Envoy Service may be public; this one stays inside the cluster). */}}
{{- define "tokenlb.adminServiceName" -}}
{{- include "tokenlb.suffixed" (list . "admin") -}}
{{- end -}}

{{/* Ports. tokenlb's ext_proc port is fixed at 9002 (the Endpoint Picker
Protocol's default, and deploy/envoy.yaml's tokenlb cluster); admin 9090
(deploy/tokenlb.yaml); Envoy listens on 8080 (deploy/envoy.yaml). */}}
{{- define "tokenlb.grpcPort" -}}9002{{- end -}}
{{- define "tokenlb.adminPort" -}}9090{{- end -}}
{{- define "tokenlb.envoyPort" -}}8080{{- end -}}

{{/* Mount points. */}}
{{- define "tokenlb.configDir" -}}/etc/tokenlb/config{{- end -}}
{{- define "tokenlb.tlsDir" -}}/etc/tokenlb/tls{{- end -}}
{{- define "tokenlb.envoyDir" -}}/etc/envoy{{- end -}}

{{/* What the pod is: the endpoint picker (gateway) or the gateway itself
(standalone). */}}
{{- define "tokenlb.component" -}}
{{- if eq .Values.mode "gateway" -}}endpoint-picker{{- else -}}gateway{{- end -}}
{{- end -}}

{{- define "tokenlb.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tokenlb.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tokenlb.labels" -}}
{{ include "tokenlb.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | toString | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/*
Checks the values once, before anything renders, naming the value at fault.
*/}}
{{- define "tokenlb.validate" -}}
{{- $v := .Values -}}
{{- if not (has $v.mode (list "gateway" "standalone")) -}}
{{- fail (printf "mode: %v is neither gateway nor standalone" $v.mode) -}}
{{- end -}}
{{- if not (has $v.backends.source (list "inferencePool" "service")) -}}
{{- fail (printf "backends.source: %v is neither inferencePool nor service" $v.backends.source) -}}
{{- end -}}
{{- if and (eq $v.mode "gateway") (ne $v.backends.source "inferencePool") -}}
{{- fail "backends.source: gateway mode needs inferencePool (a Gateway routes to an InferencePool, which names tokenlb as its endpoint picker)" -}}
{{- end -}}
{{- if eq $v.backends.source "service" -}}
{{- if not $v.backends.service.name -}}
{{- fail "backends.service.name: required when backends.source is service" -}}
{{- end -}}
{{- else if $v.inferencePool.create -}}
{{- if not $v.inferencePool.modelServers.matchLabels -}}
{{- fail "inferencePool.modelServers.matchLabels: required to create the InferencePool (the labels of the model server pods)" -}}
{{- end -}}
{{- $ports := $v.inferencePool.targetPorts | default list -}}
{{- if or (lt (len $ports) 1) (gt (len $ports) 8) -}}
{{- fail (printf "inferencePool.targetPorts: %d ports, want 1 to 8" (len $ports)) -}}
{{- end -}}
{{- range $ports -}}
{{- if or (not (kindIs "map" .)) (lt (int .number) 1) (gt (int .number) 65535) -}}
{{- fail (printf "inferencePool.targetPorts: %v is not {number: 1 to 65535}" .) -}}
{{- end -}}
{{- end -}}
{{- else if not $v.inferencePool.name -}}
{{- fail "inferencePool.name: required when inferencePool.create is false (the existing pool to follow)" -}}
{{- end -}}
{{- if not (has $v.inferencePool.failureMode (list "FailOpen" "FailClose")) -}}
{{- fail (printf "inferencePool.failureMode: %v is neither FailOpen nor FailClose" $v.inferencePool.failureMode) -}}
{{- end -}}
{{- if not (has $v.provider.name (list "none" "istio" "gke")) -}}
{{- fail (printf "provider.name: %v is not none, istio or gke" $v.provider.name) -}}
{{- end -}}
{{- if and (eq $v.mode "standalone") (ne $v.provider.name "none") -}}
{{- fail "provider.name: standalone mode has no Gateway in front: leave it none" -}}
{{- end -}}
{{- if and (eq $v.provider.name "gke") (not $v.inferencePool.create) -}}
{{- fail "provider.name: gke's policies target the pool the chart creates; with an existing pool, attach them where the pool is made" -}}
{{- end -}}
{{- if not (has $v.tls.mode (list "selfSigned" "secret" "plaintext")) -}}
{{- fail (printf "tls.mode: %v is not selfSigned, secret or plaintext" $v.tls.mode) -}}
{{- end -}}
{{- if and (eq $v.mode "gateway") (eq $v.tls.mode "secret") (not $v.tls.secret.name) -}}
{{- fail "tls.secret.name: required when tls.mode is secret" -}}
{{- end -}}
{{- $dr := $v.provider.istio.destinationRule -}}
{{- if and (eq $v.provider.name "istio") (eq $v.tls.mode "selfSigned") $dr.credentialName -}}
{{- fail "provider.istio.destinationRule.credentialName: no CA can verify the certificate tokenlb makes at start (tls.mode selfSigned); leave it empty, or use tls.mode secret" -}}
{{- end -}}
{{- if and (eq $v.provider.name "istio") (eq $v.tls.mode "secret") $v.tls.secret.clientCAKey (not $dr.credentialName) -}}
{{- fail "provider.istio.destinationRule.credentialName: tokenlb asks for a client certificate (tls.secret.clientCAKey), so Istio's gateway needs one: a Secret in its namespace with tls.crt, tls.key and ca.crt" -}}
{{- end -}}
{{- if lt (int $v.replicas) 1 -}}
{{- fail "replicas: at least 1" -}}
{{- end -}}
{{- end -}}

{{/*
tokenlb.yaml. Settings left out have their defaults (deploy/tokenlb.yaml
documents them all); each one set here says why.
*/}}
{{- define "tokenlb.config" -}}
{{- $v := .Values -}}
{{- if eq $v.mode "gateway" -}}
# tokenlb as the endpoint picker of InferencePool {{ include "tokenlb.poolName" . }}: gateways in
# other pods open ext_proc streams to it through Service {{ include "tokenlb.fullname" . }}.
# Gateways connect from other pods: every interface, so never without TLS or a mesh.
listen: 0.0.0.0:{{ include "tokenlb.grpcPort" . }}
tls:
{{- if eq $v.tls.mode "selfSigned" }}
  # A certificate made at start, as gateways expect of an endpoint picker by default.
  self_signed: true
{{- else if eq $v.tls.mode "secret" }}
  # Secret {{ $v.tls.secret.name }}'s certificate, read again when the Secret changes.
  cert_file: {{ include "tokenlb.tlsDir" . }}/{{ $v.tls.secret.certKey }}
  key_file: {{ include "tokenlb.tlsDir" . }}/{{ $v.tls.secret.keyKey }}
{{- with $v.tls.secret.clientCAKey }}
  # Mutual TLS: only gateways with a certificate this CA signed connect.
  client_ca_file: {{ include "tokenlb.tlsDir" $ }}/{{ . }}
{{- end }}
{{- else }}
  # The mesh's sidecars encrypt and authenticate the streams (tls.mode plaintext).
  allow_plaintext: true
{{- end }}
{{- else -}}
# tokenlb beside Envoy in the same pod; Envoy reaches it on loopback
# (deploy/envoy.yaml's tokenlb cluster), where plaintext is safe.
# Loopback only: no one outside the pod can steer traffic.
listen: 127.0.0.1:{{ include "tokenlb.grpcPort" . }}
{{- end }}
# The kubelet's probes and Prometheus reach /healthz, /readyz and /metrics from outside the pod.
admin: 0.0.0.0:{{ include "tokenlb.adminPort" . }}
discovery:
  # The hosts come from the Kubernetes API, in tokenlb's own namespace (the Role allows no other).
  source: kubernetes
  kubernetes:
{{- if eq $v.backends.source "service" }}
    # The ready endpoints of Service {{ $v.backends.service.name }} (from its EndpointSlices).
    service: {{ $v.backends.service.name | quote }}
{{- with $v.backends.service.port }}
    # The Service's port the model servers listen on.
    port: {{ . | toString | quote }}
{{- end }}
{{- else }}
    # The pool's ready pods, each at each of its targetPorts.
    inference_pool: {{ include "tokenlb.poolName" . | quote }}
{{- end }}
{{- if eq $v.mode "gateway" }}
# Gateways read the whole ordered list (chosen host, then fallbacks) from the
# header, as the Endpoint Picker Protocol has it; it equals the envoy.lb metadata.
destination_list: true
{{- end }}
# On SIGTERM, report not ready this long, so that new streams move elsewhere first.
shutdown_delay: {{ $v.config.shutdownDelay }}
# Then up to this long for the requests being routed (within the pod's grace period).
drain_timeout: {{ $v.config.drainTimeout }}
{{- if ne $v.config.logFormat "text" }}
# For the cluster's log collector (config.logFormat).
log_format: {{ $v.config.logFormat }}
{{- end }}
{{- with $v.config.extra }}
# Set through config.extra.
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* tokenlb's probes. The kubelet's gRPC probes speak plaintext to the
pod's IP, so they reach the ext_proc port's liveness and readiness services
only where that port is plaintext on every interface (gateway mode,
tls.mode plaintext); otherwise the admin port's /healthz and /readyz answer
the same. tokenlb starts serving once discovery found the model servers,
which can take as long as a model takes to load: the startup probe waits up
to 15 min. */}}
{{- define "tokenlb.probes" -}}
{{- if and (eq .Values.mode "gateway") (eq .Values.tls.mode "plaintext") -}}
startupProbe:
  grpc: {port: {{ include "tokenlb.grpcPort" . }}, service: liveness}
  periodSeconds: 5
  failureThreshold: 180
livenessProbe:
  grpc: {port: {{ include "tokenlb.grpcPort" . }}, service: liveness}
readinessProbe:
  grpc: {port: {{ include "tokenlb.grpcPort" . }}, service: readiness}
{{- else -}}
startupProbe:
  httpGet: {path: /healthz, port: admin}
  periodSeconds: 5
  failureThreshold: 180
livenessProbe:
  httpGet: {path: /healthz, port: admin}
readinessProbe:
  httpGet: {path: /readyz, port: admin}
{{- end -}}
{{- end -}}
