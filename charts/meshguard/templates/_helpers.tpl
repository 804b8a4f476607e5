{{/*
Names are fixed rather than derived from the release name: the Istio side (the EnvoyFilter
in istio/) calls the authz Service by name, and the cluster-scoped objects exist once per
cluster.
*/}}

{{- define "meshguard.chart" -}}
{{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object; call with (dict "root" $ "component" "webhook"). */}}
{{- define "meshguard.labels" -}}
helm.sh/chart: {{ include "meshguard.chart" .root }}
{{ include "meshguard.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: meshguard
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels; call with (dict "root" $ "component" "webhook"). */}}
{{- define "meshguard.selectorLabels" -}}
app.kubernetes.io/name: meshguard
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end }}

{{/* An image reference from {repository, tag, digest}: repository, then @digest or :tag
(default: the appVersion). Called with (dict "image" IMAGE "root" $). */}}
{{- define "meshguard.imageRef" -}}
{{- $image := .image -}}
{{- if $image.digest -}}
{{ printf "%s@%s" $image.repository $image.digest }}
{{- else -}}
{{ printf "%s:%s" $image.repository (default .root.Chart.AppVersion $image.tag) }}
{{- end -}}
{{- end }}

{{/* The servers' image (webhook, authz). */}}
{{- define "meshguard.image" -}}
{{ include "meshguard.imageRef" (dict "image" .Values.image "root" .) }}
{{- end }}

{{/* The slim init image: meshguard-init and meshguard-validation in every pod, and what
runs on the nodes. webhook.initImage (a full reference, the older value) wins when set. */}}
{{- define "meshguard.initImage" -}}
{{- if .Values.webhook.initImage -}}
{{ .Values.webhook.initImage }}
{{- else -}}
{{ include "meshguard.imageRef" (dict "image" .Values.init.image "root" .) }}
{{- end -}}
{{- end }}

{{- define "meshguard.webhook.serviceAccountName" -}}
{{ default "meshguard-webhook" .Values.webhook.serviceAccount.name }}
{{- end }}

{{- define "meshguard.authz.serviceAccountName" -}}
{{ default "meshguard-authz" .Values.authz.serviceAccount.name }}
{{- end }}

{{/* DNS names of the webhook Service, for its certificate. */}}
{{- define "meshguard.webhook.dnsNames" -}}
{{- $name := .Values.webhook.service.name -}}
{{- $ns := .Release.Namespace -}}
{{- list $name (printf "%s.%s" $name $ns) (printf "%s.%s.svc" $name $ns) (printf "%s.%s.svc.cluster.local" $name $ns) | toJson -}}
{{- end }}

{{/* Pod-level security context shared by both servers. */}}
{{- define "meshguard.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.runAsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container-level security context shared by both servers. */}}
{{- define "meshguard.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Scheduling of a component's pods; call with (dict "root" $ "component" "webhook" "values"
.Values.webhook). An explicit affinity wins; otherwise pod anti-affinity by hostname.
*/}}
{{- define "meshguard.scheduling" -}}
{{- $values := .values -}}
{{- if $values.affinity }}
affinity:
  {{- toYaml $values.affinity | nindent 2 }}
{{- else if eq $values.podAntiAffinity "preferred" }}
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- include "meshguard.selectorLabels" . | nindent 14 }}
{{- else if eq $values.podAntiAffinity "required" }}
affinity:
  podAntiAffinity:
    requiredDuringSchedulingIgnoredDuringExecution:
      - topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "meshguard.selectorLabels" . | nindent 12 }}
{{- end }}
{{- with $values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* namespaceSelector terms every webhook entry shares: the opt-out label and exclusions. */}}
{{- define "meshguard.webhook.exclusions" -}}
- key: {{ .Values.webhook.optOutLabel.key }}
  operator: NotIn
  values:
    - {{ .Values.webhook.optOutLabel.value | quote }}
- key: kubernetes.io/metadata.name
  operator: NotIn
  values:
    {{- toYaml (uniq (prepend .Values.webhook.excludeNamespaces .Release.Namespace)) | nindent 4 }}
{{- end }}

{{/*
TLS modes. generated: the chart makes the CA (a new one at every render without a cluster:
`helm template`, Argo CD); existingSecret: the operator creates the Secret tls.secretName and
the chart only references it; certManager: a cert-manager Certificate writes that Secret.
existingSecret and certManager render the same bytes every time (GitOps).
*/}}

{{/*
The caBundle of the webhook entries in existingSecret mode: tls.existingSecret.caBundle,
base64 of the PEM CA (PEM text is accepted too and encoded). Empty in the other modes (the
generated mode has its own, from the same genCA call as the Secret) and when the value is
empty (cainjector fills it, see meshguard.webhook.caInjection).
*/}}
{{- define "meshguard.webhook.caBundle" -}}
{{- if eq .Values.tls.mode "existingSecret" -}}
{{- $ca := .Values.tls.existingSecret.caBundle | trim -}}
{{- if hasPrefix "-----BEGIN" $ca -}}
{{ printf "%s\n" $ca | b64enc }}
{{- else -}}
{{ $ca }}
{{- end -}}
{{- end -}}
{{- end }}

{{/*
Annotations of the MutatingWebhookConfiguration that make cert-manager's cainjector fill the
caBundle: certManager mode, from the chart's Certificate; existingSecret mode without a
caBundle value, from the Secret itself (cainjector requires the Secret to carry the
annotation cert-manager.io/allow-direct-injection: "true"). Empty otherwise.
*/}}
{{- define "meshguard.webhook.caInjection" -}}
{{- if eq .Values.tls.mode "certManager" -}}
cert-manager.io/inject-ca-from: {{ .Release.Namespace }}/meshguard-webhook
{{- else if and (eq .Values.tls.mode "existingSecret") (not (include "meshguard.webhook.caBundle" .)) -}}
cert-manager.io/inject-ca-from-secret: {{ .Release.Namespace }}/{{ .Values.tls.secretName }}
{{- end -}}
{{- end }}

{{/*
Graceful drain of a server pod; call with (dict "root" $ "component" "webhook" "values"
.Values.webhook). A deleted pod leaves the Service's endpoints at once (EndpointSlice
ready=false) but kube-proxy and the API server learn it a few seconds later: the preStop
sleep keeps the server answering meanwhile. Then SIGTERM: the server reports not ready
(/readyz 503, gRPC health NOT_SERVING), stops accepting, finishes in-flight requests and
exits, all within terminationGracePeriodSeconds.
*/}}
{{- define "meshguard.drain.pod" -}}
{{- $drain := .values.drain -}}
{{- $sleep := int $drain.preStopSleepSeconds -}}
{{- $grace := int $drain.terminationGracePeriodSeconds -}}
{{- $inflight := 0 -}}
{{- if eq .component "webhook" }}{{ $inflight = int .root.Values.webhook.timeoutSeconds }}{{ end -}}
{{- if le $grace (add $sleep $inflight) -}}
{{- fail (printf "%s.drain.terminationGracePeriodSeconds (%d) must exceed preStopSleepSeconds (%d)%s, or the kubelet kills the server before it has drained" .component $grace $sleep (ternary (printf " + webhook.timeoutSeconds (%d)" $inflight) "" (gt $inflight 0))) -}}
{{- end -}}
terminationGracePeriodSeconds: {{ $grace }}
{{- end }}

{{/* The container's preStop hook (see meshguard.drain.pod); sleep is in the image. */}}
{{- define "meshguard.drain.container" -}}
{{- $sleep := int .values.drain.preStopSleepSeconds -}}
{{- if gt $sleep 0 -}}
lifecycle:
  preStop:
    exec:
      command:
        - sleep
        - {{ $sleep | quote }}
{{- end -}}
{{- end }}

{{/* The node agent's image (cni.image): empty repository means the slim init image. */}}
{{- define "meshguard.cniImage" -}}
{{- if .Values.cni.image.repository -}}
{{ include "meshguard.imageRef" (dict "image" .Values.cni.image "root" .) }}
{{- else -}}
{{ include "meshguard.initImage" . }}
{{- end -}}
{{- end }}


{{/*
Why the authz server would get no workload certificate from Istio, or "": given Istio's
MutatingWebhookConfigurations (.webhooks), Istio injects with revisions only (no default
revision, no tag named default), so sidecar.istio.io/inject=true selects nothing.
*/}}
{{- define "meshguard.authz.noDefaultRevision" -}}
{{- $revisions := list }}
{{- $default := false }}
{{- range .webhooks }}
{{- $labels := .metadata.labels | default dict }}
{{- $rev := get $labels "istio.io/rev" }}
{{- $tag := get $labels "istio.io/tag" }}
{{- if $rev }}
{{- $revisions = append $revisions (default $rev $tag) }}
{{- if or (eq $tag "default") (and (eq $rev "default") (not $tag)) }}
{{- $default = true }}
{{- end }}
{{- end }}
{{- end }}
{{- if and $revisions (not $default) -}}
Istio has no default revision here (its injectors serve {{ uniq $revisions | sortAlpha | join ", " }}): the authz server's workload certificate comes from Istio's injection and sidecar.istio.io/inject=true selects nothing; set authz.istioRevision to one of them
{{- end }}
{{- end }}

{{/*
Why Istio CNI mode without meshguard's node agent is refused, or "": given the cluster's
DaemonSets (.daemonSets), one is Istio's CNI node agent.
*/}}
{{- define "meshguard.cni.istioCniWithoutAgent" -}}
{{- range .daemonSets }}
{{- $labels := .metadata.labels | default dict }}
{{- if or (eq .metadata.name "istio-cni-node") (eq (get $labels "k8s-app") "istio-cni-node") -}}
Istio runs in CNI mode here (DaemonSet {{ .metadata.namespace }}/{{ .metadata.name }}) but cni.enabled is false: pods would get meshguard-validation and no node would install their rules, so they would never start; set cni.enabled=true
{{- break }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Why Istio is too old for the L7 engine's listener, or "": given Istio's
MutatingWebhookConfigurations (.webhooks; istiod's chart labels them with its
app.kubernetes.io/version) and the engine (.engine), the injectors whose Istio ships an Envoy
without a field the listener uses (docs/envoy-versions.md: the minimums per engine). Istio's
charts built from source say 1.0.0: not a release, not judged.
*/}}
{{- define "meshguard.istio.tooOld" -}}
{{- $minimum := get (dict "native" "1.23" "ext-authz" "1.18") .engine | default "1.23" }}
{{- $min := splitList "." $minimum }}
{{- $old := list }}
{{- range .webhooks }}
{{- $labels := .metadata.labels | default dict }}
{{- $version := get $labels "app.kubernetes.io/version" | toString }}
{{- $minor := regexFind "^[0-9]+[.][0-9]+" $version }}
{{- if and (hasKey $labels "istio.io/rev") $minor (ne $minor "1.0") }}
{{- $v := splitList "." $minor }}
{{- $major := atoi (index $v 0) }}
{{- if or (lt $major (atoi (index $min 0))) (and (eq $major (atoi (index $min 0))) (lt (atoi (index $v 1)) (atoi (index $min 1)))) }}
{{- $old = append $old (printf "%s (revision %s: Istio %s)" .metadata.name (get $labels "istio.io/rev") $version) }}
{{- end }}
{{- end }}
{{- end }}
{{- if $old -}}
Istio is older than {{ $minimum }} here, the oldest Istio whose Envoy has every field of the {{ .engine }} L7 engine's loopback listener (docs/envoy-versions.md): {{ join ", " $old }}; its sidecars would refuse the listener and meshguard's pods would get no L7 decisions (their L7-covered flows refused). Upgrade Istio{{ if eq .engine "native" }}, or set webhook.l7Engine=ext-authz (Istio >= 1.18){{ end }}
{{- end }}
{{- end }}

{{/*
What the webhook does with pods Istio gave no init step (webhook.withoutIstioInit): empty
means node with cni.enabled, else skip. node without the node agent would leave such pods
with meshguard-validation and nobody to install their rules: they would never start.
*/}}
{{- define "meshguard.webhook.withoutIstioInit" -}}
{{- $chosen := .Values.webhook.withoutIstioInit | default (ternary "node" "skip" .Values.cni.enabled) -}}
{{- if and (eq $chosen "node") (not .Values.cni.enabled) -}}
{{- fail "webhook.withoutIstioInit=node installs the rules of pods Istio gave no init step from the node, but cni.enabled is false: no node would install them and those pods would never start; set cni.enabled=true, or choose skip or privileged" -}}
{{- end -}}
{{- $chosen -}}
{{- end }}
