{{/* Names, labels and the pieces every pod shares. */}}

{{- define "dicom-router.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dicom-router.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "dicom-router.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "dicom-router.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: include "dicom-router.selectorLabels" (list . "mlflow") */}}
{{- define "dicom-router.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "dicom-router.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* The Helm labels added to everything the chart owns (the renderer's labels are kept as they are). */}}
{{- define "dicom-router.helmLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: dicom-router
{{- end }}

{{- define "dicom-router.labels" -}}
{{ include "dicom-router.selectorLabels" . }}
{{ include "dicom-router.helmLabels" (index . 0) }}
{{- end }}

{{/* An image of the project: include "dicom-router.image" (list . "worker") */}}
{{- define "dicom-router.image" -}}
{{- $root := index . 0 -}}
{{- printf "%s/%s:%s" $root.Values.images.registry (index . 1) (default $root.Chart.AppVersion $root.Values.images.tag) }}
{{- end }}

{{- define "dicom-router.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "dicom-router.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Shared by every pod spec: service account, pull secrets, security context. */}}
{{- define "dicom-router.podCommon" -}}
serviceAccountName: {{ include "dicom-router.fullname" . }}
automountServiceAccountToken: false
# No <SERVICE>_PORT/_HOST variables: with the release named dicom-router, the Service dicom-router-s3
# would become DICOM_ROUTER_S3_PORT=tcp://…, which the settings (prefix DICOM_ROUTER_) read as theirs.
enableServiceLinks: false
{{- with .Values.images.pullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- include "dicom-router.podSecurityContext" . | nindent 2 }}
{{- end }}

{{- define "dicom-router.s3Endpoint" -}}
{{- if .Values.s3.inCluster -}}
{{- printf "http://%s-s3.%s.svc.cluster.local:9000" (include "dicom-router.fullname" .) .Release.Namespace }}
{{- else -}}
{{- required "s3.endpoint is required when s3.inCluster is false" .Values.s3.endpoint }}
{{- end }}
{{- end }}

{{- define "dicom-router.mlflowUrl" -}}
{{- printf "http://%s-mlflow.%s.svc.cluster.local:5000" (include "dicom-router.fullname" .) .Release.Namespace }}
{{- end }}

{{- define "dicom-router.predictorUrl" -}}
{{- printf "http://%s-predictor.%s.svc.cluster.local" .Values.inferenceService.name .Release.Namespace }}
{{- end }}

{{/* S3 client settings: the endpoint, bucket and the credentials from s3.existingSecret. */}}
{{- define "dicom-router.s3Env" -}}
- name: DICOM_ROUTER_S3_ENDPOINT_URL
  value: {{ include "dicom-router.s3Endpoint" . | quote }}
- name: DICOM_ROUTER_S3_REGION
  value: {{ .Values.s3.region | quote }}
- name: DICOM_ROUTER_S3_BUCKET
  value: {{ .Values.s3.bucket | quote }}
- name: DICOM_ROUTER_S3_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ .Values.s3.existingSecret }}, key: AWS_ACCESS_KEY_ID}
- name: DICOM_ROUTER_S3_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ .Values.s3.existingSecret }}, key: AWS_SECRET_ACCESS_KEY}
{{- end }}

{{/* What a platform job needs to reach MLflow: the server and the account it logs in with. */}}
{{- define "dicom-router.mlflowClientEnv" -}}
- name: DICOM_ROUTER_MLFLOW_TRACKING_URI
  value: {{ include "dicom-router.mlflowUrl" . | quote }}
- name: MLFLOW_TRACKING_USERNAME
  valueFrom:
    secretKeyRef: {name: {{ .Values.mlflow.clientSecret }}, key: username}
- name: MLFLOW_TRACKING_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ .Values.mlflow.clientSecret }}, key: password}
{{- end }}

{{- define "dicom-router.commonEnv" -}}
- name: HOME
  value: /tmp
- name: DICOM_ROUTER_DEID_KEY
  valueFrom:
    secretKeyRef: {name: {{ .Values.deid.existingSecret }}, key: deid-key}
{{- end }}

{{- define "dicom-router.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- end }}
