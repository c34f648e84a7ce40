#!/bin/sh
# Horovod host discovery (horovodrun --host-discovery-script) on Kubernetes: the running, ready pods that carry the
# job's label, by the name the launcher pod reaches them at (their pod IP: pods have no DNS names of their own
# unless a headless Service gives them one). Needs kubectl in the launcher pod and a service account that may
# list pods in the namespace. Slots per pod: $DSTRAIN_SLOTS (default 1).
#
#   dstrain/launch/discover/kubernetes.sh 'training.kubeflow.org/job-name=ds-train,training.kubeflow.org/job-role=worker'
selector=${1:?usage: kubernetes.sh LABEL_SELECTOR}
kubectl get pods -l "$selector" --field-selector=status.phase=Running \
  -o jsonpath='{range .items[*]}{.status.podIP}{" "}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' |
  awk -v slots="${DSTRAIN_SLOTS:-1}" '$1 != "" && $2 == "True" { print $1 ":" slots }'
