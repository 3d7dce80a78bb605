#!/usr/bin/env bash
# The Secrets vidistill needs before its first deploy, with a fresh random database password, printed
# as YAML for kubectl (nothing is written to disk, nothing is committed):
#
#   bash k8s/create-secrets.sh | kubectl apply -f -
#
# The cluster rehearsal (`make rehearsal`) runs this same script and starts every pod with what it prints.
# Only one Secret is required: vidistill-postgres (PostgreSQL's and MLflow's database login). The others
# are optional and only for setups that need them (k8s/README.md, "Secrets"):
#   vidistill-mlflow-s3    S3 credentials, when MLflow's artifact store is s3:// (MLFLOW_S3=1 here, with
#                          AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment)
#   vidistill-mlflow-auth  client credentials, when a login guards MLflow (MLFLOW_TRACKING_USERNAME and
#                          MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN, in the environment)
set -euo pipefail
NAMESPACE=${NAMESPACE:-vidistill}
secret() { kubectl -n "$NAMESPACE" create secret generic "$@" --dry-run=client -o yaml; echo ---; }

# URL-safe (hex): the password becomes part of MLflow's backend store URI
secret vidistill-postgres --from-literal=POSTGRES_USER=mlflow --from-literal=POSTGRES_DB=mlflow \
  --from-literal=POSTGRES_PASSWORD="$(openssl rand -hex 24)"
if [ "${MLFLOW_S3:-0}" = 1 ]; then
  secret vidistill-mlflow-s3 --from-literal=AWS_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID" \
    --from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY" \
    ${MLFLOW_S3_ENDPOINT_URL:+--from-literal=MLFLOW_S3_ENDPOINT_URL="$MLFLOW_S3_ENDPOINT_URL"}
fi
auth=()
for key in MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD MLFLOW_TRACKING_TOKEN; do
  [ -n "${!key:-}" ] && auth+=(--from-literal="$key=${!key}")
done
if [ ${#auth[@]} -gt 0 ]; then
  secret vidistill-mlflow-auth "${auth[@]}"
fi
