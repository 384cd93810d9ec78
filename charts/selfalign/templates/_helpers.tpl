{{/* Names, labels and the operator's RBAC rules, shared by every template. */}}

{{- define "selfalign.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "selfalign.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "selfalign.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "selfalign.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "selfalign.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "selfalign.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: selfalign
{{- end }}

{{- define "selfalign.selectorLabels" -}}
app.kubernetes.io/name: {{ include "selfalign.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "selfalign.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "selfalign.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* More than one replica: the replicas coordinate through kopf peering. */}}
{{- define "selfalign.peering" -}}
{{- if gt (int .Values.replicaCount) 1 }}true{{ end }}
{{- end }}

{{- define "selfalign.operatorImage" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* The image of one stage: (list $ "synthesize" "vllm") gives <registry>/stage-vllm:<tag>. */}}
{{- define "selfalign.stageImage" -}}
{{- $root := index . 0 }}
{{- $stage := index $root.Values.stages (index . 1) }}
{{- $tag := default $root.Chart.AppVersion $root.Values.stages.tag }}
{{- default (printf "%s/stage-%s:%s" $root.Values.stages.registry (index . 2) $tag) $stage.image }}
{{- end }}

{{/*
Namespaced rules: what the operator does in the namespaces it serves, kept to the calls in
operator/*.py (tests/test_chart.py derives those calls from the code and compares both ways).
*/}}
{{- define "selfalign.namespacedRules" -}}
# Runs: watched by kopf (list, watch); each reconcile pass reads the current one (get).
- apiGroups: [selfalign.dev]
  resources: [selfalignruns]
  verbs: [get, list, watch]
# Children set blockOwnerDeletion on their ownerReference to the run: with the
# OwnerReferencesPermissionEnforcement admission plugin that needs update on the run's finalizers.
- apiGroups: [selfalign.dev]
  resources: [selfalignruns/finalizers]
  verbs: [update]
# Run status is written through the status subresource only.
- apiGroups: [selfalign.dev]
  resources: [selfalignruns/status]
  verbs: [patch]
# Stage Jobs: watched for progress, created from the plan, patched only to suspend or resume
# one (spec.suspend), never deleted; read on a 409 to check that the existing one is this run's
# (a deleted run's Job of the same name is not).
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch]
# Stage Pods: watched for their termination message (the stage's result summary).
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
# The run's spec for its stage Pods: created, and updated when the spec changes (read on a 409:
# whose it is).
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, patch]
# The headless Service of a multi-node training Job (read on a 409: whose it is).
- apiGroups: [""]
  resources: [services]
  verbs: [get, create]
# The run's NetworkPolicy (stages.networkPolicy), created once (read on a 409: whose it is).
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, create]
# Events on runs: transitions and failures.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end }}

{{/* Cluster-scoped reads kopf needs to discover CRDs and (namespaced mode) namespaces. */}}
{{- define "selfalign.discoveryRules" -}}
# kopf notices CRDs appearing and changing (its resource scanning).
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- if .Values.watchNamespaces }}
# kopf resolves the watched namespaces and notices them being created or deleted.
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
{{- end }}
{{- end }}

{{/* kopf peering between replicas: watch to see the peers, patch to announce itself. */}}
{{- define "selfalign.peeringRules" -}}
{{- $resource := ternary "kopfpeerings" "clusterkopfpeerings" (not (empty .Values.watchNamespaces)) }}
- apiGroups: [kopf.dev]
  resources: [{{ $resource }}]
  verbs: [list, watch]
- apiGroups: [kopf.dev]
  resources: [{{ $resource }}]
  resourceNames: [{{ include "selfalign.fullname" . }}]
  verbs: [patch]
{{- end }}
