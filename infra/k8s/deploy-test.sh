#!/usr/bin/env bash
# make deploy-test: the chart on a real Kubernetes cluster, running the project's own images, and DICOM
# routed through its pods.
#
#   1. build the images with buildah from infra/docker/Dockerfile (infra/images/build.sh; layers cached)
#   2. a cluster: $KUBECONFIG when it points at one (images must then be where its nodes can pull them),
#      else the single-node Kubernetes of ../shared/k8s (started here, images imported, stopped on exit)
#   3. the KServe CRD, a namespace enforcing Pod Security "restricted", the deployment contract's Secrets
#      (generated), helm install with infra/k8s/deploy-test-values.yaml; every Deployment Available
#   4. a model: a seeded bundle exported here, uploaded to the in-cluster S3, the predictor enabled (helm upgrade)
#   5. DICOM by C-STORE to the Orthanc Service; each instance classified by the predictor pod and
#      delivered where the rules say (a destination Orthanc pod); one compiled pipeline task run as a Job
#      in the components image with the IR's command and Secret/ConfigMap wiring; the drift CronJob's
#      job run once
#
# Needs root on the machine for the local cluster (../shared/k8s/README.md). Times of each phase are
# printed at the end. Env: DEPLOY_TEST_KEEP=1 leaves the local cluster running (stop it with its down.sh).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$REPO"
SHARED="${DICOM_ROUTER_SHARED_DIR:-$REPO/../shared}"
NS=dicom-router
RELEASE=dicom-router
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)"
HELM="$REPO/.tools/helm3/helm"
PY="$REPO/.venv/bin/python"
WORK="${DEPLOY_TEST_WORK:-/var/tmp/dicom-router-deploy-test}"   # on disk: the components image is 7.5 GB
IMAGES=(orthanc predictor worker components)
T0=$(date +%s)
declare -a TIMES=()
phase() { TIMES+=("$(printf '%-28s %5ss' "$1" $(( $(date +%s) - PHASE_START )))"); PHASE_START=$(date +%s); }
log() { printf '[deploy-test %4ss] %s\n' $(( $(date +%s) - T0 )) "$*"; }
PHASE_START=$T0

# --- 1. images ---------------------------------------------------------------------------------------
mkdir -p "$WORK/images"
log "building images: ${IMAGES[*]}"
infra/images/build.sh --save "$WORK/images" "${IMAGES[@]}"
phase "build images"

# --- 2. cluster ----------------------------------------------------------------------------------------
LOCAL=0
if [ -n "${KUBECONFIG:-}" ] && kubectl version --request-timeout=5s >/dev/null 2>&1; then
  log "using the cluster of KUBECONFIG=$KUBECONFIG (images must be pullable there as ghcr.io/dicom-router/*:$VERSION)"
else
  LOCAL=1
  K8S_BIN="$WORK/bin"
  RUN="$WORK/run"
  mkdir -p "$K8S_BIN"
  [ -x "$K8S_BIN/kubelet" ] || tar -C "$K8S_BIN" -xJf "$SHARED/k8s/kube-bin-v1.36.2.tar.xz"
  need=""
  for tool in containerd etcd conntrack nft iptables; do command -v "$tool" >/dev/null || need=1; done
  [ -x /usr/lib/cni/bridge ] || [ -x /opt/cni/bin/bridge ] || need=1
  if [ -n "$need" ]; then
    log "apt-get install the local cluster's packages"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq containerd containernetworking-plugins \
      etcd-server iptables nftables conntrack openssl curl iproute2 >/dev/null
  fi
  stop_cluster() {
    local rc=$?
    if [ "${DEPLOY_TEST_KEEP:-0}" = 1 ]; then
      log "cluster left running: KUBECONFIG=$RUN/kubeconfig; stop: K8S_BIN=$K8S_BIN $SHARED/k8s/down.sh $RUN --wipe"
    else
      log "stopping the local cluster"
      K8S_BIN="$K8S_BIN" "$SHARED/k8s/down.sh" "$RUN" --wipe >/dev/null 2>&1 || true
    fi
    exit $rc
  }
  trap stop_cluster EXIT
  K8S_BIN="$K8S_BIN" "$SHARED/k8s/down.sh" "$RUN" --wipe >/dev/null 2>&1 || true   # a run killed earlier
  log "starting the local cluster (../shared/k8s/up.sh), importing the images"
  K8S_BIN="$K8S_BIN" IMAGES="$WORK/images" "$SHARED/k8s/up.sh" "$RUN" > "$WORK/up.log" 2>&1 \
    || { tail -30 "$WORK/up.log"; exit 1; }
  export KUBECONFIG="$RUN/kubeconfig"
  export PATH="$K8S_BIN:$PATH"
  "$SHARED/k8s/manifests/hostpath-pvs.sh" "$RUN" 3 5Gi | kubectl apply -f - >/dev/null
fi
phase "cluster up + images imported"

# --- 3. install ------------------------------------------------------------------------------------------
kubectl apply --server-side -f "$SHARED/k8s-schemas/kserve/serving.kserve.io_inferenceservices.yaml" >/dev/null
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl label namespace "$NS" --overwrite pod-security.kubernetes.io/enforce=restricted >/dev/null
secret() { # name key=value...
  local name=$1; shift
  kubectl -n "$NS" create secret generic "$name" $(printf -- '--from-literal=%s ' "$@") \
    --dry-run=client -o yaml | kubectl apply -f - >/dev/null
}
random() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
S3_KEY="router-$(random | head -c 8)" S3_SECRET="$(random)"
secret dicom-router-s3 "AWS_ACCESS_KEY_ID=$S3_KEY" "AWS_SECRET_ACCESS_KEY=$S3_SECRET"
secret dicom-router-deid "deid-key=$(random)"
secret dicom-router-orthanc username=router "password=$(random)"
secret dicom-router-mlflow-client username=platform "password=$(random)"
DEST_PASSWORD="$(random)"
secret destination "password=$DEST_PASSWORD"
NODE_IP=10.244.0.1   # the local node's address on its bridge: where C-STORE comes from
[ "$LOCAL" = 1 ] || NODE_IP="$(kubectl get nodes -o jsonpath='{.items[0].status.addresses[?(@.type=="InternalIP")].address}')"
RULES="$WORK/values-test.yaml"
cat > "$RULES" <<EOF
orthanc:
  senders:
    modality: {aet: MODALITY, host: "$NODE_IP", port: 104}
worker:
  rules:
    destinations:
      pacs: {aet: PACS, host: destination.$NS.svc.cluster.local, port: 4242}
    review: {destination: pacs, below_confidence: 0.0}
    rules: []
    default: pacs
drift:
  reference: s3://dicom-router/inference-log
EOF
sed "s/VERSION/$VERSION/" infra/k8s/destination.yaml | kubectl -n "$NS" apply -f - >/dev/null
log "helm install (no model yet)"
"$HELM" upgrade --install "$RELEASE" charts/dicom-router -n "$NS" \
  -f infra/k8s/deploy-test-values.yaml -f "$RULES" >/dev/null
"$PY" infra/k8s/deploy_test.py ready --namespace "$NS"   # on progress, not a deadline; says why if stuck
phase "install + Available"

# --- 4. a model ---------------------------------------------------------------------------------------------
svc_ip() { kubectl -n "$NS" get service "$1" -o jsonpath='{.spec.clusterIP}'; }
S3_URL="http://$(svc_ip "$RELEASE-s3"):9000"
BUNDLE_URI="s3://dicom-router/models/bodypart-router/1"
log "exporting a seeded 32 px bundle and uploading it to the in-cluster S3 ($S3_URL)"
DICOM_ROUTER_DATA_DIR="$WORK/data" DICOM_ROUTER_S3_ENDPOINT_URL="$S3_URL" \
  DICOM_ROUTER_S3_ACCESS_KEY_ID="$S3_KEY" DICOM_ROUTER_S3_SECRET_ACCESS_KEY="$S3_SECRET" \
  "$PY" infra/k8s/deploy_test.py publish --bundle-uri "$BUNDLE_URI" --sample "$WORK/sample"
"$HELM" upgrade "$RELEASE" charts/dicom-router -n "$NS" --reuse-values \
  --set inferenceService.enabled=true --set-string inferenceService.modelVersion=1 \
  --set inferenceService.storageUri="$BUNDLE_URI" >/dev/null
"$PY" infra/k8s/deploy_test.py ready --namespace "$NS"
phase "model published + predictor"

# --- 5. route DICOM through the pods; the drift job ----------------------------------------------------------
ORTHANC_IP="$(svc_ip "$RELEASE-orthanc")"
DEST_IP="$(svc_ip destination)"
log "C-STORE to Orthanc at $ORTHANC_IP:4242; checking delivery at the destination"
DICOM_ROUTER_DEPLOY_TEST_PASSWORD="$DEST_PASSWORD" "$PY" infra/k8s/deploy_test.py route \
  --sample "$WORK/sample" --orthanc "$ORTHANC_IP" --destination "http://$DEST_IP:8042" \
  --namespace "$NS" --pod "$(kubectl -n "$NS" get pod -l app.kubernetes.io/component=orthanc -o name | head -1)"
phase "route through the pods"
log "one compiled pipeline task (plan-shards) as a Job in the components image, wired as the IR says"
"$PY" infra/k8s/deploy_test.py step --namespace "$NS" --pipeline pipelines/compiled/training.yaml \
  --task plan-shards --source s3://dicom-router/deploy-test/dicom
phase "pipeline task as a Job"
log "running the drift CronJob once"
kubectl -n "$NS" create job drift-now --from="cronjob/$RELEASE-drift" >/dev/null
"$PY" infra/k8s/deploy_test.py drift --namespace "$NS" --job drift-now
phase "drift job"

printf '%s\n' "${TIMES[@]}"
log "passed"
