#!/usr/bin/env bash
# Install what the chart expects on a cluster, at pinned versions, with the current kubectl context:
#   cert-manager (KServe's webhooks), KServe (Standard deployment mode: plain Deployments, no Knative),
#   Kubeflow Pipelines (standalone), and with --gpu the NVIDIA device plugin (nvidia.com/gpu resources).
# Usage: infra/prerequisites.sh [--gpu] [--dry-run]
# Idempotent (server-side apply / helm upgrade --install). Needs kubectl and helm 3.17+ (make tools).
set -euo pipefail

CERT_MANAGER_VERSION=v1.17.2
KSERVE_VERSION=v0.21.0          # the kserve Python package in requirements/lock.txt is 0.21.0
KFP_VERSION=2.14.0              # Kubeflow Pipelines backend for the kfp 2.x SDK in the lock
NVIDIA_DEVICE_PLUGIN_VERSION=0.17.1

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HELM="${HELM:-$ROOT/.tools/helm3/helm}"
[ -x "$HELM" ] || HELM=helm
GPU=0
RUN=
for arg in "$@"; do
  case "$arg" in
    --gpu) GPU=1 ;;
    --dry-run) RUN=echo ;;
    *) echo "usage: $0 [--gpu] [--dry-run]" >&2; exit 64 ;;
  esac
done

step() { printf '\n== %s\n' "$*"; }

step "cert-manager $CERT_MANAGER_VERSION"
$RUN kubectl apply --server-side -f \
  "https://github.com/cert-manager/cert-manager/releases/download/$CERT_MANAGER_VERSION/cert-manager.yaml"
$RUN kubectl -n cert-manager rollout status deploy/cert-manager-webhook --timeout=300s

step "KServe $KSERVE_VERSION (Standard mode)"
$RUN kubectl apply --server-side -f \
  "https://github.com/kserve/kserve/releases/download/$KSERVE_VERSION/kserve.yaml"
$RUN kubectl -n kserve rollout status deploy/kserve-controller-manager --timeout=300s
$RUN kubectl apply --server-side -f \
  "https://github.com/kserve/kserve/releases/download/$KSERVE_VERSION/kserve-cluster-resources.yaml"
# Standard (raw Deployment) mode by default: no Knative, no scale-to-zero (the chart sets it per
# InferenceService too).
$RUN kubectl -n kserve patch configmap inferenceservice-config --type merge \
  -p '{"data":{"deploy":"{\"defaultDeploymentMode\":\"Standard\"}"}}'

step "Kubeflow Pipelines $KFP_VERSION (standalone)"
$RUN kubectl apply -k \
  "github.com/kubeflow/pipelines/manifests/kustomize/cluster-scoped-resources?ref=$KFP_VERSION"
$RUN kubectl wait --for condition=established --timeout=120s crd/applications.app.k8s.io
$RUN kubectl apply -k \
  "github.com/kubeflow/pipelines/manifests/kustomize/env/platform-agnostic?ref=$KFP_VERSION"
$RUN kubectl -n kubeflow rollout status deploy/ml-pipeline --timeout=600s

if [ "$GPU" = 1 ]; then
  step "NVIDIA device plugin $NVIDIA_DEVICE_PLUGIN_VERSION"
  $RUN "$HELM" repo add nvdp https://nvidia.github.io/k8s-device-plugin --force-update
  $RUN "$HELM" upgrade --install nvdp nvdp/nvidia-device-plugin --namespace nvidia-device-plugin \
    --create-namespace --version "$NVIDIA_DEVICE_PLUGIN_VERSION" --wait
  # GPU nodes: label nvidia.com/gpu.present=true and taint nvidia.com/gpu=present:NoSchedule, as the
  # chart's inferenceService.gpu nodeSelector and tolerations expect (infra/README.md).
fi

step "done"
