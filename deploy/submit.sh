#!/usr/bin/env bash
# Submit `sdedit run` to a running Ray cluster through the Ray Jobs API.
#
#   RAY_ADDRESS=http://head:8265 deploy/submit.sh s3://bucket/manifests/ s3://bucket/out/ \
#       --model s3://bucket/models/church --t0 0.4 --t0 0.5 --samples 2
#
# Credentials reach the job through the cluster's environment (instance roles, or the
# AWS_* variables set on the worker pods): they are never put on the command line.
set -euo pipefail
: "${RAY_ADDRESS:?set RAY_ADDRESS to the Ray dashboard address, e.g. http://head:8265}"
if [ "$#" -lt 2 ]; then
    echo "usage: $0 MANIFEST OUTPUT [sdedit run options...]" >&2
    exit 2
fi
# --address auto comes first: click keeps an option's last value, so an --address among the
# arguments replaces it. The id's random suffix keeps two submissions in one second apart (the
# second was refused: "Job with submission_id ... already exists").
exec ray job submit --address "$RAY_ADDRESS" \
    --submission-id "sdedit-$(date +%Y%m%d-%H%M%S)-$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')" \
    -- sdedit run --address auto "$@"
