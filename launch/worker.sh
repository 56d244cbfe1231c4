#!/usr/bin/env bash
# The TPU-VM-worker side of launch/tpu_vm.sh, run in the checkout on every worker over
# `gcloud compute tpus tpu-vm ssh --worker=...`:
#
#   setup [--data-archive FILE | --data gs://...] [--nfs HOST:/SHARE --nfs-mount DIR]
#       the data at ../shared/data, the NFS share mounted at DIR (writable), Python >= 3.11,
#       then launch/setup.sh --tpu
#   run --job NAME --output-dir DIR [--hosts N] [--bucket gs://.../NAME] [--sync-every SECONDS] -- COMMAND...
#       restore DIR from the bucket (a rerun resumes), then run COMMAND detached under a
#       supervisor: its output goes to logs/NAME.log, SIGTERM is forwarded to it (the learner
#       saves a checkpoint), worker 0 copies DIR to the bucket every SECONDS and when it
#       ends, and its exit status lands in logs/NAME.rc. With N > 1 hosts in the slice the job
#       gets QSHARP_JAX_DISTRIBUTED=1 (qsharp_jax.train then joins the multi-host runtime).
#   logs --job NAME        print the log, following it until the job ends; exit with its status
#   stop --job NAME        SIGTERM the job
#   sync --job NAME --output-dir DIR --bucket gs://.../NAME   copy DIR and the log now
#
# The bucket layout is gs://.../NAME/output (= DIR) and gs://.../NAME/logs/.
set -euo pipefail
cd "$(dirname "$0")/.."

die() {
	printf 'error: %s\n' "$*" >&2
	exit 2
}

log_line() {
	printf '[%s] %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$*"
}

# This worker's index in the slice (0 = the first host); QSHARP_WORKER_ID overrides.
worker_id() {
	if [[ -n ${QSHARP_WORKER_ID:-} ]]; then
		echo "$QSHARP_WORKER_ID"
		return
	fi
	curl -sf -m 5 -H 'Metadata-Flavor: Google' \
		http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number ||
		echo 0
}

JOB="" OUT="" BUCKET="" SYNC_EVERY=600 HOSTS=1 DATA="" ARCHIVE="" NFS="" NFS_MOUNT="" COMMAND=()

parse() {
	while (($#)); do
		case $1 in
		--job | --output-dir | --bucket | --sync-every | --hosts | --data | --data-archive | --nfs | --nfs-mount)
			(($# >= 2)) || die "$1 needs a value."
			case $1 in
			--job) JOB=$2 ;;
			--output-dir) OUT=$2 ;;
			--bucket) BUCKET=${2%/} ;;
			--sync-every) SYNC_EVERY=$2 ;;
			--hosts) HOSTS=$2 ;;
			--data) DATA=$2 ;;
			--data-archive) ARCHIVE=$2 ;;
			--nfs) NFS=$2 ;;
			--nfs-mount) NFS_MOUNT=$2 ;;
			esac
			shift 2
			;;
		--)
			shift
			COMMAND=("$@")
			break
			;;
		*) die "unknown argument '$1' (see the header of launch/worker.sh)." ;;
		esac
	done
}

need_job() {
	[[ $JOB =~ ^[A-Za-z0-9_.-]+$ ]] || die "pass --job NAME (letters, digits, '.', '_', '-')."
	LOG=logs/$JOB.log PIDFILE=logs/$JOB.pid RCFILE=logs/$JOB.rc
}

running_pid() {
	local pid
	pid=$(cat "$PIDFILE" 2>/dev/null) || return 1
	[[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

sync_output() {
	if [[ -d $OUT ]]; then
		gcloud storage rsync --recursive --exclude='.*orbax-checkpoint-tmp.*' "$OUT" "$BUCKET/output"
	fi
	if [[ -f $LOG ]]; then
		gcloud storage cp "$LOG" "$BUCKET/logs/$JOB-worker$(worker_id).log"
	fi
}

# apt-get install, retried: a fresh image's first-boot apt jobs may hold the dpkg lock.
apt_install() {
	local attempt
	for attempt in 1 2 3 4 5 6; do
		if sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"; then
			return 0
		fi
		log_line "apt-get install $* failed (attempt $attempt); retrying in 30 s"
		sleep 30
	done
	die "could not install $* with apt-get."
}

cmd_setup() {
	local data_dir=../shared/data
	if [[ -n $NFS ]]; then
		[[ -n $NFS_MOUNT ]] || die "--nfs needs --nfs-mount DIR."
		command -v mount.nfs >/dev/null || apt_install nfs-common
		sudo mkdir -p "$NFS_MOUNT"
		mountpoint -q "$NFS_MOUNT" || sudo mount -t nfs -o rw,hard "$NFS" "$NFS_MOUNT"
		sudo chmod a+rwx "$NFS_MOUNT"
		log_line "worker $(worker_id): $NFS mounted at $NFS_MOUNT"
	fi
	if [[ -n $ARCHIVE ]]; then
		mkdir -p "$data_dir"
		tar -xzf "$ARCHIVE" -C "$data_dir"
	elif [[ -n $DATA ]]; then
		mkdir -p "$data_dir"
		gcloud storage rsync --recursive "$DATA" "$data_dir"
	fi
	local py="" candidate
	for candidate in python3.13 python3.12 python3.11 python3; do
		if command -v "$candidate" >/dev/null &&
			"$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
			py=$candidate
			break
		fi
	done
	if [[ -z $py ]]; then # TPU VM images are Ubuntu 22.04 (Python 3.10); its universe has 3.11
		apt_install python3.11 python3.11-venv
		py=python3.11
	fi
	PYTHON=$py bash launch/setup.sh --tpu
}

cmd_run() {
	need_job
	[[ -n $OUT ]] || die "pass --output-dir DIR (the job's output, synced to the bucket)."
	((${#COMMAND[@]})) || die "pass the command to run after '--'."
	if ! [[ $SYNC_EVERY =~ ^[0-9]+$ ]] || ((10#$SYNC_EVERY == 0)); then
		die "--sync-every must be a positive number of seconds."
	fi
	[[ $HOSTS =~ ^[1-9][0-9]*$ ]] || die "--hosts must be the number of hosts in the slice (1 or more)."
	mkdir -p logs
	local pid
	if pid=$(running_pid); then
		die "job $JOB is already running on this worker (pid $pid): follow it with 'logs' or end it with 'stop'."
	fi
	rm -f "$RCFILE" "$PIDFILE"
	if [[ -n $BUCKET ]] && gcloud storage ls "$BUCKET/output/" >/dev/null 2>&1; then
		log_line "restoring $OUT from $BUCKET/output (resuming)"
		mkdir -p "$OUT"
		gcloud storage rsync --recursive "$BUCKET/output" "$OUT"
	fi
	local args=(--job "$JOB" --output-dir "$OUT" --sync-every "$SYNC_EVERY" --hosts "$HOSTS")
	[[ -n $BUCKET ]] && args+=(--bucket "$BUCKET")
	setsid nohup bash launch/worker.sh _supervise "${args[@]}" -- "${COMMAND[@]}" >"$LOG" 2>&1 </dev/null &
	local waited
	for waited in $(seq 50); do
		[[ -s $PIDFILE ]] && break
		sleep 0.1
	done
	[[ -s $PIDFILE ]] || die "the job did not start (after $waited checks); see $PWD/$LOG."
	log_line "worker $(worker_id): started job $JOB (pid $(cat "$PIDFILE")), log in $PWD/$LOG"
}

cmd_supervise() {
	need_job
	echo $$ >"$PIDFILE"
	local me syncer="" status child
	me=$(worker_id)
	if ((HOSTS > 1)); then
		export QSHARP_JAX_DISTRIBUTED=1 # one process per host joins the slice's runtime
	fi
	log_line "worker $me of $HOSTS: ${COMMAND[*]}"
	"${COMMAND[@]}" &
	child=$!
	trap 'log_line "SIGTERM: forwarding it to the job (pid $child)"; kill -TERM "$child" 2>/dev/null || true' TERM
	if [[ -n $BUCKET && $me == 0 ]]; then
		(
			# SIGTERM ends the loop at once while it sleeps, or after the copy in progress
			nap=""
			trap 'kill "$nap" 2>/dev/null; exit 0' TERM
			while :; do
				sleep "$SYNC_EVERY" &
				nap=$!
				wait "$nap"
				sync_output >/dev/null 2>&1 || log_line "copy to $BUCKET failed; retrying in $SYNC_EVERY s"
			done
		) &
		syncer=$!
	fi
	while :; do
		status=0
		wait "$child" || status=$?
		kill -0 "$child" 2>/dev/null || break # else the wait was cut short by SIGTERM: keep waiting
	done
	if [[ -n $syncer ]]; then
		kill "$syncer" 2>/dev/null || true
		wait "$syncer" 2>/dev/null || true
	fi
	log_line "job ended with status $status"
	if [[ -n $BUCKET && $me == 0 ]]; then
		if sync_output >/dev/null 2>&1; then
			log_line "copied $OUT to $BUCKET/output"
		else
			log_line "final copy to $BUCKET failed"
		fi
	fi
	echo "$status" >"$RCFILE"
}

cmd_logs() {
	need_job
	[[ -f $LOG ]] || die "no log of job $JOB on this worker: start it with 'run --job $JOB'."
	local pid
	if pid=$(running_pid); then
		tail -n +1 --pid="$pid" -F "$LOG"
	else
		cat "$LOG"
	fi
	[[ -f $RCFILE ]] || die "job $JOB stopped without recording its status (the VM restarted?): rerun it to resume."
	exit "$(cat "$RCFILE")"
}

cmd_stop() {
	need_job
	local pid
	if pid=$(running_pid); then
		kill -TERM "$pid"
		log_line "worker $(worker_id): sent SIGTERM to job $JOB (pid $pid)"
	else
		log_line "worker $(worker_id): job $JOB is not running"
	fi
}

cmd_sync() {
	need_job
	[[ -n $OUT && -n $BUCKET ]] || die "sync needs --output-dir DIR and --bucket gs://.../$JOB."
	sync_output
}

main() {
	local cmd=${1:-}
	(($#)) && shift
	parse "$@"
	case $cmd in
	setup) cmd_setup ;;
	run) cmd_run ;;
	_supervise) cmd_supervise ;;
	logs) cmd_logs ;;
	stop) cmd_stop ;;
	sync) cmd_sync ;;
	*) die "unknown command '$cmd': use setup, run, logs, stop or sync (see the header of launch/worker.sh)." ;;
	esac
}

main "$@"
