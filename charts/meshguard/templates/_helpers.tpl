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

{{/* The image reference: repository, then @digest or :tag (default: the appVersion). */}}
{{- define "meshguard.image" -}}
{{- $image := .Values.image -}}
{{- if $image.digest -}}
{{ printf "%s@%s" $image.repository $image.digest }}
{{- else -}}
{{ printf "%s:%s" $image.repository (default .Chart.AppVersion $image.tag) }}
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
