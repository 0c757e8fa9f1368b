#!/usr/bin/env bash
# Simulate msrun's multi-node launch on one machine: two network namespaces joined by a veth pair stand for two
# nodes with their own addresses, and each runs its own `msrun --node_rank=K` (so only node 0, which owns
# --master_addr, starts the scheduler). Needs root and `ip netns` (iproute2).
#
#   tools/simulate_two_nodes.sh [--log_dir=DIR] [--master_port=N] [--local_worker_num=N] [other msrun --opt=value]
#       train.py [train.py arguments ...] --use_parallel True
#   tools/simulate_two_nodes.sh --check     # only set up and tear down the namespaces (exit 0 if that works)
#
# Node K's msrun logs (scheduler on node 0, worker_<rank>.log) go to DIR/nodeK; its console is DIR/nodeK.out.
# Namespaces: ${PIXART_NETNS_PREFIX:-pixart-node}{0,1} with ${PIXART_NETNS_SUBNET:-10.77.0}.{1,2}/24; stale ones are
# replaced, and they are removed (with anything still running in them) on exit. msrun starts the `python` on PATH.
set -uo pipefail

die() { echo "error: $*" >&2; exit 1; }

prefix=${PIXART_NETNS_PREFIX:-pixart-node}
subnet=${PIXART_NETNS_SUBNET:-10.77.0}
log_dir=output/msrun-two-nodes port=8118 per_node=1 check=0 grace=${PIXART_NODE_GRACE_S:-60}
msrun_opts=()
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --check) check=1 ;;
    --log_dir=*) log_dir=${1#*=} ;;
    --master_port=*) port=${1#*=} ;;
    --local_worker_num=*) per_node=${1#*=} ;;
    --worker_num=* | --node_rank=* | --master_addr=*) die "$1 is set by this script (2 nodes, node 0 is master)" ;;
    --*=*) msrun_opts+=("$1") ;;
    *) die "msrun options must be given as --name=value before the script, got '$1'" ;;
  esac
  shift
done
[[ $check -eq 1 || $# -gt 0 ]] || die "usage: $0 [--log_dir=DIR] [--master_port=N] [msrun --opt=value ...] train.py ARGS"

[[ $(id -u) -eq 0 ]] || die "simulating two nodes needs root (it creates network namespaces); run it as root"
command -v ip >/dev/null && ip netns list >/dev/null 2>&1 || die "'ip netns' is not available (install iproute2)"
[[ $check -eq 1 ]] || command -v msrun >/dev/null || die "msrun not found on PATH (activate MindSpore's environment)"

ns=("${prefix}0" "${prefix}1")
addr=("${subnet}.1" "${subnet}.2")

cleanup() {
  trap - EXIT INT TERM
  local n pids
  for n in "${ns[@]}"; do  # what runs in our namespaces is what this script started (msrun and its workers)
    pids=$(ip netns pids "$n" 2>/dev/null) && [[ -n $pids ]] && kill $pids 2>/dev/null
  done
  for n in "${ns[@]}"; do
    pids=$(ip netns pids "$n" 2>/dev/null) && [[ -n $pids ]] && { sleep 2; kill -9 $(ip netns pids "$n") 2>/dev/null; }
    ip netns del "$n" 2>/dev/null
  done
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for n in "${ns[@]}"; do
  ip netns del "$n" 2>/dev/null  # a stale one from an interrupted run
  err=$(ip netns add "$n" 2>&1) || die "cannot create network namespace $n: ${err//$'\n'/ }"
  ip -n "$n" link set lo up || die "cannot bring up lo in $n"
done
err=$(ip link add name veth0 netns "${ns[0]}" type veth peer name veth1 netns "${ns[1]}" 2>&1) ||
  die "cannot create a veth pair between ${ns[0]} and ${ns[1]}: ${err//$'\n'/ }"
for k in 0 1; do
  ip -n "${ns[k]}" addr add "${addr[k]}/24" dev "veth$k" && ip -n "${ns[k]}" link set "veth$k" up ||
    die "cannot configure veth$k (${addr[k]}) in ${ns[k]}"
done
if [[ $check -eq 1 ]]; then
  echo "ok: ${ns[0]} (${addr[0]}) <-> ${ns[1]} (${addr[1]})"
  exit 0
fi

mkdir -p "$log_dir" || die "cannot create --log_dir $log_dir"
pid=()
for k in 0 1; do
  ip netns exec "${ns[k]}" msrun --worker_num=$((2 * per_node)) --local_worker_num="$per_node" --node_rank=$k \
    --master_addr="${addr[0]}" --master_port="$port" --log_dir="$log_dir/node$k" --join=True "${msrun_opts[@]}" \
    "$@" >"$log_dir/node$k.out" 2>&1 &
  pid[k]=$!
  echo "node $k: ${ns[k]} (${addr[k]}), pid ${pid[k]}, logs $log_dir/node$k"
done

# Wait for both; once one launch has failed, give the other $grace s to notice before stopping it.
rc=("" "") failed_at=""
while [[ -z ${rc[0]} || -z ${rc[1]} ]]; do
  for k in 0 1; do
    if [[ -z ${rc[k]} ]] && ! kill -0 "${pid[k]}" 2>/dev/null; then
      wait "${pid[k]}"; rc[k]=$?
      [[ ${rc[k]} -ne 0 && -z $failed_at ]] && failed_at=$SECONDS
    fi
  done
  if [[ -n $failed_at && $((SECONDS - failed_at)) -ge $grace ]]; then
    for k in 0 1; do [[ -z ${rc[k]} ]] && kill "${pid[k]}" 2>/dev/null; done
  fi
  sleep 1
done
echo "node 0 exit code ${rc[0]}, node 1 exit code ${rc[1]}"
[[ ${rc[0]} -eq 0 && ${rc[1]} -eq 0 ]] || { echo "error: a launch failed; see $log_dir/node{0,1}.out and" \
  "$log_dir/node{0,1}/" >&2; exit 1; }
