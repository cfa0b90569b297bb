{{/*
Names, labels and small values shared by the templates.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name: fullnameOverride, else "<release>-<name>" (just "<release>" when the
release name already contains the chart name). Truncated to 63 characters (DNS label).
*/}}
{{- define "kubetune.fullname" -}}
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

{{/* "name-version" for the helm.sh/chart label (never in selectors: it changes on upgrade). */}}
{{- define "kubetune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object of the release carries. */}}
{{- define "kubetune.labels" -}}
helm.sh/chart: {{ include "kubetune.chart" . }}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetune
{{- end }}

{{/* Labels that select the operator pod: stable across upgrades. */}}
{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* The operator's ServiceAccount name. */}}
{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* "repository:tag" or "repository@digest" of an image block; the tag defaults to appVersion. */}}
{{- define "kubetune.image" -}}
{{- $image := index . 0 }}{{- $root := index . 1 }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{/*
The namespaces the operator watches, as a JSON list: `watchNamespaces` plus, with
`watchNamespaceSelector`, every namespace whose labels match it, found with `lookup` when the
chart is installed or upgraded. `lookup` needs a live cluster (helm install/upgrade, or helm
template --dry-run=server): rendered offline, as Argo CD does, it finds nothing, and an empty
result fails the render instead of falling back to cluster-wide mode.
*/}}
{{- define "kubetune.watchedNamespaces" -}}
{{- $names := .Values.watchNamespaces | default list }}
{{- with .Values.watchNamespaceSelector }}
{{- $selector := . }}
{{- $found := list }}
{{- range (lookup "v1" "Namespace" "" "").items | default list }}
{{- $labels := .metadata.labels | default dict }}
{{- $match := true }}
{{- range $key, $value := $selector }}{{ if ne (toString (get $labels $key)) (toString $value) }}{{ $match = false }}{{ end }}{{ end }}
{{- if $match }}{{ $found = append $found .metadata.name }}{{ end }}
{{- end }}
{{- if not $found }}
{{- fail "watchNamespaceSelector matched no namespace (or the chart was rendered without a cluster, where Helm's lookup finds nothing, e.g. by Argo CD): list the namespaces in watchNamespaces instead" }}
{{- end }}
{{- $names = concat $names $found | uniq | sortAlpha }}
{{- end }}
{{- toJson $names }}
{{- end }}

{{/*
KUBETUNE_NAMESPACES: `operator.namespacePatterns` (a shard's patterns; cluster-wide RBAC), else the
watched namespaces (empty = the whole cluster).
*/}}
{{- define "kubetune.operatorNamespaces" -}}
{{- if .Values.operator.namespacePatterns }}
{{- if .Values.watchNamespaces }}
{{- fail "operator.namespacePatterns needs watchNamespaces empty: patterns match namespaces that namespaced RBAC cannot list ahead" }}
{{- end }}
{{- join "," .Values.operator.namespacePatterns }}
{{- else }}
{{- include "kubetune.watchedNamespaces" . | fromJsonArray | join "," }}
{{- end }}
{{- end }}

{{/* The Secret that holds the progress-token signing key. */}}
{{- define "kubetune.progressKeySecret" -}}
{{- default (printf "%s-progress-key" (include "kubetune.fullname" .)) .Values.progressKey.existingSecret }}
{{- end }}

{{/* The URL trainer pods POST progress reports to. */}}
{{- define "kubetune.progressUrl" -}}
{{- if .Values.operator.progressUrl }}
{{- .Values.operator.progressUrl }}
{{- else }}
{{- printf "%s://%s.%s.svc:%d/v1/reports" (ternary "https" "http" .Values.progressTls.enabled) (include "kubetune.fullname" .) .Release.Namespace (int .Values.service.port) }}
{{- end }}
{{- end }}

{{/*
The platform policy document the operator reads (see docs/install.md#platform-policy).
Each namespace entry is complete: a key it leaves out takes the value from `defaults`; a key it
sets replaces the default's, an explicit 0, [] or null included; and a key the defaults leave
unset (allowedServingImages, allowedTrainerImages) is kept.
*/}}
{{- define "kubetune.policy" -}}
apiVersion: kubetune.io/v1alpha1
kind: PlatformPolicy
defaults:
  {{- toYaml .Values.policy.defaults | nindent 2 }}
{{- if .Values.policy.namespaces }}
namespaces:
  {{- range $namespace, $limits := .Values.policy.namespaces }}
  {{- $complete := deepCopy $.Values.policy.defaults }}
  {{- range $key, $value := $limits }}
  {{- $_ := set $complete $key $value }}
  {{- end }}
  {{ $namespace | quote }}:
    {{- toYaml $complete | nindent 4 }}
  {{- end }}
{{- else }}
namespaces: {}
{{- end }}
{{- end }}
