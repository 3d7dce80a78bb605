#!/usr/bin/env bash
# The Secrets vidistill needs, printed as YAML for kubectl (nothing is written to disk or committed; the
# manifests hold no Secret, so `kubectl apply -k` never overwrites these):
#
#   bash k8s/create-secrets.sh | kubectl apply -f -          # before the first deploy: vidistill-postgres
#   bash k8s/create-secrets.sh auth | kubectl apply -f -     # later, only if a login guards MLflow
#   MLFLOW_S3=1 bash k8s/create-secrets.sh s3 | kubectl apply -f -
#
# WHAT is one or more of: postgres (the default), auth, s3. Each run of `postgres` makes a NEW random
# password: run it once, before the database's first start (the database keeps the password it was
# initialised with). The cluster rehearsal (`make rehearsal`) runs this same script.
#   postgres  vidistill-postgres: PostgreSQL's and MLflow's database login (required)
#   auth      vidistill-mlflow-auth: MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or
#             MLFLOW_TRACKING_TOKEN) from the environment, for the pipeline's tasks and the predictor
#   s3        vidistill-mlflow-s3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and MLFLOW_S3_ENDPOINT_URL)
#             from the environment, when MLflow's artifact store is s3://
set -euo pipefail
NAMESPACE=${NAMESPACE:-vidistill}
secret() { kubectl -n "$NAMESPACE" create secret generic "$@" --dry-run=client -o yaml; echo ---; }
from_env() {  # --from-literal for each variable of "$@" that is set
  for key in "$@"; do [ -n "${!key:-}" ] && printf -- '--from-literal=%s=%s\n' "$key" "${!key}"; done; return 0
}
[ $# -gt 0 ] || set -- postgres
for what in "$@"; do
  case "$what" in
    postgres)  # URL-safe (hex): the password becomes part of MLflow's backend store URI
      secret vidistill-postgres --from-literal=POSTGRES_USER=mlflow --from-literal=POSTGRES_DB=mlflow \
        --from-literal=POSTGRES_PASSWORD="$(openssl rand -hex 24)" ;;
    auth)
      mapfile -t args < <(from_env MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD MLFLOW_TRACKING_TOKEN)
      [ ${#args[@]} -gt 0 ] || { echo "create-secrets.sh auth: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)" >&2; exit 2; }
      secret vidistill-mlflow-auth "${args[@]}" ;;
    s3)
      mapfile -t args < <(from_env AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY MLFLOW_S3_ENDPOINT_URL)
      [ ${#args[@]} -ge 2 ] || { echo "create-secrets.sh s3: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" >&2; exit 2; }
      secret vidistill-mlflow-s3 "${args[@]}" ;;
    *) echo "create-secrets.sh: unknown Secret '$what'; choose postgres, auth or s3" >&2; exit 2 ;;
  esac
done
