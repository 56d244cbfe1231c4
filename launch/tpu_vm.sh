#!/usr/bin/env bash
# qsharp-jax on Cloud TPU VMs: queue a slice, set it up, run a qsharp_jax command on every
# worker, stream its log, copy its output to GCS, delete the slice.
# Run `bash launch/tpu_vm.sh --help` for the commands and options.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SCOPES=https://www.googleapis.com/auth/cloud-platform # lets the workers write to the bucket
MODULES=(train generate convert export)

usage() {
	cat <<'EOF'
Usage: bash launch/tpu_vm.sh COMMAND [OPTIONS] [-- QSHARP_JAX_ARGS...]

Commands (every gcloud call needs --project and --zone):
  create   queue a TPU VM slice (a queued resource, spot or on-demand) and wait until it is
           ACTIVE; an ACTIVE slice of that name is reused, a preempted (SUSPENDED) or FAILED
           one is deleted and queued again
  setup    copy this checkout (the files git does not ignore) and the data to every worker, then
           install Python >= 3.11 and the project (launch/setup.sh --tpu) on each
  run      start `python -m qsharp_jax.MODULE ARGS` on every worker (--worker=all), detached
           and logged; with --bucket, the output dir is first restored from GCS (so a rerun
           resumes) and worker 0 copies it to GCS every --sync-every seconds and at the end
  logs     stream a worker's log until the job ends; exits with the job's status
  stop     send SIGTERM to the job on every worker (the learner saves a checkpoint first)
  copy     copy worker 0's output dir and log to the bucket
  delete   delete the queued resource and its TPU VM
  launch   create, setup, run, logs, copy, then delete (kept when the job failed or --keep)

Options (--opt VALUE or --opt=VALUE):
  --project ID          GCP project (default: $CLOUDSDK_CORE_PROJECT)
  --zone ZONE           e.g. us-west4-a (v5e), us-central2-b (v4) (default: $CLOUDSDK_COMPUTE_ZONE)
  --accelerator TYPE    v5litepod-8 (alias v5e-8), v4-32, v5p-8, v6e-8, ...; needed by create and
                        run (multi-host slices run one process per host, joined by jax.distributed)
  --runtime-version V   TPU VM image (default per family: v5litepod v2-alpha-tpuv5-lite,
                        v4 tpu-ubuntu2204-base, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  --spot | --on-demand  provisioning model (default on-demand)
  --name NAME           queued resource, TPU VM and job name (default qsharp-ACCELERATOR)
  --module M            qsharp_jax entry point: train (default), generate, convert, export
  --config FILE[:PRESET]  train config (default configs/gsm8k.py; e.g. configs/gsm8k.py:paper)
  --output-dir DIR      the job's output dir on the workers, relative to the checkout
                        (default runs/NAME; train gets --config.output_dir=DIR)
  --bucket gs://B/P     results go to gs://B/P/NAME/{output,logs}; needed by copy, launch
                        and any run on a spot VM (a preempted VM loses its disk)
  --data DIR|gs://...   placed at ../shared/data beside the checkout on every worker
                        (default: this checkout's ../shared/data if it exists)
  --nfs HOST:/SHARE     an NFS share (e.g. Filestore) that setup mounts at /mnt/qsharp-nfs on every
                        worker; train then keeps the guide checkpoints there (--config.learner.
                        checkpoint_dir=/mnt/qsharp-nfs/NAME/guide). Multi-host train needs it (or
                        that override pointing at another directory all hosts share)
  --sync-every SECONDS  period of worker 0's copies to the bucket during a run (default 600)
  --worker N            the worker whose log `logs` streams (default 0)
  --keep                launch: keep the TPU VM after the run
  --dry-run             print every command instead of running it
  -h, --help            this text

Example (a v5e-8 spot VM, the paper's GSM8K preset, results in a bucket):
  bash launch/tpu_vm.sh launch --project my-proj --zone us-west4-a --accelerator v5litepod-8 \
      --spot --bucket gs://my-bucket/qsharp --config configs/gsm8k.py:paper \
      -- --config.reference.path=../shared/data/llama3-8b-instruct
Rerunning the same command after a preemption queues a new VM and resumes from the bucket.
EOF
}

die() {
	printf 'error: %s\n' "$*" >&2
	exit 2
}

# ---- printing and running commands --------------------------------------------------------

# One shell word: as is when it is made of safe characters, else single-quoted.
# A --flag=VALUE word quotes only its value.
quote_word() {
	local w=$1 prefix=""
	if [[ $w =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
		printf '%s' "$w"
		return
	fi
	if [[ $w =~ ^(--[a-z][-a-z0-9]*=)(.*)$ ]]; then
		prefix=${BASH_REMATCH[1]} w=${BASH_REMATCH[2]}
	fi
	printf "%s'%s'" "$prefix" "${w//\'/\'\\\'\'}"
}

quote_cmd() {
	local out="" w
	for w in "$@"; do
		out+="${out:+ }$(quote_word "$w")"
	done
	printf '%s' "$out"
}

note() {
	printf '# %s\n' "$*"
}

# Print a command (stdout on --dry-run, else stderr with a "+ " prefix) and run it unless dry.
run() {
	if ((DRY_RUN)); then
		quote_cmd "$@"
		echo
	else
		printf '+ %s\n' "$(quote_cmd "$@")" >&2
		"$@"
	fi
}

# run, with stdout to a file.
run_to() {
	local file=$1
	shift
	if ((DRY_RUN)); then
		printf '%s > %s\n' "$(quote_cmd "$@")" "$(quote_word "$file")"
	else
		printf '+ %s > %s\n' "$(quote_cmd "$@")" "$(quote_word "$file")" >&2
		"$@" >"$file"
	fi
}

gcloud_tpu() { run gcloud compute tpus "$@" --project="$PROJECT" --zone="$ZONE"; }

# ssh WORKER REMOTE_WORDS...: run a command in the checkout on one worker or on all of them.
ssh_worker() {
	local worker=$1
	shift
	gcloud_tpu tpu-vm ssh "$NAME" --worker="$worker" --command="cd qsharp-jax && $(quote_cmd "$@")"
}

# The queued resource's state, or "" when it does not exist (dry run: printed, assumed absent).
qr_state() {
	if ((DRY_RUN)); then
		run gcloud compute tpus queued-resources describe "$NAME" --project="$PROJECT" --zone="$ZONE" \
			--format='value(state.state)'
		return 0
	fi
	gcloud compute tpus queued-resources describe "$NAME" --project="$PROJECT" --zone="$ZONE" \
		--format='value(state.state)' 2>/dev/null || true
}

# ---- options ------------------------------------------------------------------------------

COMMAND=""
PROJECT=${CLOUDSDK_CORE_PROJECT:-}
ZONE=${CLOUDSDK_COMPUTE_ZONE:-}
ACCELERATOR=""
RUNTIME=""
PROVISIONING=on-demand
NAME=""
MODULE=train
CONFIG=configs/gsm8k.py
OUTPUT_DIR=""
BUCKET=""
DATA=""
DATA_SET=0
NFS=""
NFS_MOUNT=/mnt/qsharp-nfs
SYNC_EVERY=600
WORKER=0
KEEP=0
DRY_RUN=0
EXTRA=()

set_option() {
	local opt=$1 value=$2
	case $opt in
	--project) PROJECT=$value ;;
	--zone) ZONE=$value ;;
	--accelerator) ACCELERATOR=$value ;;
	--runtime-version) RUNTIME=$value ;;
	--name) NAME=$value ;;
	--module) MODULE=$value ;;
	--config) CONFIG=$value ;;
	--output-dir) OUTPUT_DIR=$value ;;
	--bucket) BUCKET=${value%/} ;;
	--data) DATA=$value DATA_SET=1 ;;
	--nfs) NFS=$value ;;
	--sync-every) SYNC_EVERY=$value ;;
	--worker) WORKER=$value ;;
	*) die "unknown option $opt; run 'bash launch/tpu_vm.sh --help' for the options (qsharp_jax arguments go after '--')." ;;
	esac
}

parse_args() {
	local arg
	while (($#)); do
		arg=$1
		shift
		case $arg in
		--)
			EXTRA=("$@")
			break
			;;
		-h | --help)
			usage
			exit 0
			;;
		--dry-run) DRY_RUN=1 ;;
		--spot) PROVISIONING=spot ;;
		--on-demand) PROVISIONING=on-demand ;;
		--keep) KEEP=1 ;;
		--*=*) set_option "${arg%%=*}" "${arg#*=}" ;;
		--*)
			if (($# == 0)) || [[ $1 == --* ]]; then
				die "$arg needs a value, e.g. $arg=VALUE; run 'bash launch/tpu_vm.sh --help' for the options."
			fi
			set_option "$arg" "$1"
			shift
			;;
		*)
			if [[ -z $COMMAND ]]; then
				COMMAND=$arg
			else
				die "unexpected argument '$arg': give one command; pass qsharp_jax arguments after '--'."
			fi
			;;
		esac
	done
}

# FAMILY, CHIPS, HOSTS and DEFAULT_RUNTIME of ACCELERATOR (v5e-N is Cloud TPU's v5litepod-N).
accelerator_info() {
	local fix="use a Cloud TPU accelerator type such as v5litepod-8, v4-32, v5p-8 or v6e-8"
	[[ $ACCELERATOR == v5e-* ]] && ACCELERATOR=v5litepod-${ACCELERATOR#v5e-}
	[[ $ACCELERATOR =~ ^(v2|v3|v4|v5litepod|v5p|v6e)-([0-9]+)$ ]] ||
		die "--accelerator '$ACCELERATOR' is not a TPU type: $fix."
	FAMILY=${BASH_REMATCH[1]}
	local n=$((10#${BASH_REMATCH[2]}))
	case $FAMILY in
	v2 | v3) # N TensorCores, 8 per host
		((n >= 8 && n % 8 == 0)) || die "--accelerator $ACCELERATOR: $FAMILY sizes are multiples of 8 (e.g. $FAMILY-8); $fix."
		CHIPS=$((n / 2)) HOSTS=$((n / 8)) DEFAULT_RUNTIME=tpu-ubuntu2204-base
		;;
	v4 | v5p) # N TensorCores, 2 per chip, 4 chips per host
		((n >= 8 && n % 8 == 0)) || die "--accelerator $ACCELERATOR: $FAMILY sizes are multiples of 8 (e.g. $FAMILY-8, $FAMILY-32); $fix."
		CHIPS=$((n / 2)) HOSTS=$((n / 8))
		if [[ $FAMILY == v4 ]]; then DEFAULT_RUNTIME=tpu-ubuntu2204-base; else DEFAULT_RUNTIME=v2-alpha-tpuv5; fi
		;;
	v5litepod | v6e) # N chips; up to 8 on one host, else 4 per host
		case $n in
		1 | 4 | 8) HOSTS=1 ;;
		16 | 32 | 64 | 128 | 256) HOSTS=$((n / 4)) ;;
		*) die "--accelerator $ACCELERATOR: $FAMILY comes in 1, 4, 8, 16, 32, 64, 128 or 256 chips; $fix." ;;
		esac
		CHIPS=$n
		if [[ $FAMILY == v5litepod ]]; then DEFAULT_RUNTIME=v2-alpha-tpuv5-lite; else DEFAULT_RUNTIME=v2-alpha-tpuv6e; fi
		;;
	esac
}

validate() {
	case $COMMAND in
	create | setup | run | logs | stop | copy | delete | launch) ;;
	"") die "no command given: pass one of create, setup, run, logs, stop, copy, delete, launch (see --help)." ;;
	*) die "unknown command '$COMMAND': use one of create, setup, run, logs, stop, copy, delete, launch (see --help)." ;;
	esac
	[[ -n $PROJECT ]] || die "no GCP project: pass --project PROJECT_ID (or set CLOUDSDK_CORE_PROJECT)."
	[[ $PROJECT =~ ^[a-z][-a-z0-9.:]{4,61}[a-z0-9]$ ]] ||
		die "--project '$PROJECT' is not a GCP project id: pass the id (lowercase letters, digits, hyphens), not the display name."
	[[ -n $ZONE ]] || die "no zone: pass --zone ZONE, a zone that offers the accelerator (e.g. us-west4-a for v5e, us-central2-b for v4)."
	[[ $ZONE =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] ||
		die "--zone '$ZONE' is not a zone: pass one like us-west4-a (a region such as us-west4 is not enough)."
	if [[ -n $ACCELERATOR ]]; then
		accelerator_info
		RUNTIME=${RUNTIME:-$DEFAULT_RUNTIME}
	elif [[ $COMMAND == create || $COMMAND == launch || $COMMAND == run ]]; then
		die "$COMMAND needs the TPU type (run starts one process per host): pass --accelerator TYPE, e.g. v5litepod-8 or v4-32."
	fi
	if [[ -z $NAME ]]; then
		[[ -n $ACCELERATOR ]] || die "which TPU VM? pass --name NAME (or the --accelerator it was created with)."
		NAME=qsharp-$ACCELERATOR
	fi
	[[ $NAME =~ ^[a-z]([-a-z0-9]{0,48}[a-z0-9])?$ ]] ||
		die "--name '$NAME' is not a valid TPU name: use lowercase letters, digits and hyphens, starting with a letter (at most 50)."
	OUTPUT_DIR=${OUTPUT_DIR:-runs/$NAME}
	[[ $OUTPUT_DIR != /* && $OUTPUT_DIR != *..* && $OUTPUT_DIR =~ ^[A-Za-z0-9_./-]+$ ]] ||
		die "--output-dir '$OUTPUT_DIR' must be a plain path inside the checkout (e.g. runs/$NAME): it is synced to GCS and restored from it."
	if [[ -n $BUCKET ]]; then
		[[ $BUCKET =~ ^gs://[a-z0-9][-a-z0-9_.]{1,61}[a-z0-9](/[A-Za-z0-9_./-]*)?$ ]] ||
			die "--bucket '$BUCKET' is not a GCS path: pass gs://BUCKET[/PREFIX] (create it with: gcloud storage buckets create gs://BUCKET --location=REGION)."
		GCS=$BUCKET/$NAME
	fi
	if [[ -z $BUCKET ]]; then
		case $COMMAND in
		copy) die "copy needs a destination: pass --bucket gs://BUCKET/PREFIX." ;;
		launch) die "launch deletes the TPU VM at the end, with its disk: pass --bucket gs://BUCKET/PREFIX to keep the results (or run create, setup, run, logs step by step)." ;;
		run) [[ $PROVISIONING == spot ]] &&
			die "a spot VM can be preempted and its disk lost: pass --bucket gs://BUCKET/PREFIX so checkpoints and results survive and a rerun resumes (or use --on-demand)." ;;
		esac
	fi
	if ! [[ $SYNC_EVERY =~ ^[0-9]+$ ]] || ((10#$SYNC_EVERY < 30)); then
		die "--sync-every '$SYNC_EVERY' must be a whole number of seconds >= 30 (default 600)."
	fi
	[[ $WORKER =~ ^[0-9]+$ ]] || die "--worker '$WORKER' must be a worker number (0 is the first host)."
	if [[ -n $ACCELERATOR ]] && ((10#$WORKER >= HOSTS)); then
		die "--worker $WORKER: $ACCELERATOR has $HOSTS worker(s), numbered 0 to $((HOSTS - 1))."
	fi
	local module
	for module in "${MODULES[@]}"; do [[ $MODULE == "$module" ]] && break; done
	[[ $MODULE == "$module" ]] || die "--module '$MODULE' is not a qsharp_jax entry point: use one of ${MODULES[*]}."
	if [[ $MODULE == train && ($COMMAND == run || $COMMAND == launch) ]]; then
		[[ -f $ROOT/${CONFIG%%:*} ]] ||
			die "--config '$CONFIG': no file $ROOT/${CONFIG%%:*}; pass a config of this checkout, e.g. --config configs/gsm8k.py:paper."
	fi
	if [[ -n $NFS && ! $NFS =~ ^[A-Za-z0-9.-]+:/[A-Za-z0-9_./-]*$ ]]; then
		die "--nfs '$NFS' is not an NFS export: pass HOST:/SHARE, e.g. 10.0.0.2:/qsharp (a Filestore instance's IP address and file share)."
	fi
	local shared=$NFS arg
	for arg in "${EXTRA[@]}"; do [[ $arg == --config.learner.checkpoint_dir=* ]] && shared=${arg#*=}; done
	if [[ -n $ACCELERATOR && $MODULE == train && ($COMMAND == run || $COMMAND == launch) && -z $shared ]] &&
		((HOSTS > 1)); then
		die "$ACCELERATOR has $HOSTS hosts and Orbax writes each host's shards of the guide checkpoints into one directory that all of them must see: pass --nfs HOST:/SHARE (e.g. a Filestore share, mounted by setup) or -- --config.learner.checkpoint_dir=DIR on a filesystem shared by every host."
	fi
	if ((!DATA_SET)) && [[ -d $ROOT/../shared/data ]]; then
		DATA=$(cd "$ROOT/../shared/data" && pwd)
	fi
	if [[ -n $DATA && $DATA != gs://* && ! -d $DATA ]]; then
		die "--data '$DATA' is neither a directory nor a gs:// path: pass the folder holding gsm8k/ (e.g. ../shared/data)."
	fi
}

# ---- commands -----------------------------------------------------------------------------

cmd_create() {
	note "create: $NAME, $ACCELERATOR ($CHIPS chips, $HOSTS host(s)), $PROVISIONING, runtime $RUNTIME"
	local state
	state=$(qr_state)
	if ((DRY_RUN)); then
		printf '%s\n' "$state"
		state=""
	fi
	case $state in
	ACTIVE)
		echo "$NAME is ACTIVE: reusing it." >&2
		return 0
		;;
	SUSPENDED | SUSPENDING | FAILED)
		echo "$NAME is $state (preempted or failed): deleting it and queueing a new one." >&2
		cmd_delete
		state=""
		;;
	esac
	if [[ -z $state ]]; then
		local spot=()
		[[ $PROVISIONING == spot ]] && spot=(--spot)
		gcloud_tpu queued-resources create "$NAME" --node-id="$NAME" --accelerator-type="$ACCELERATOR" \
			--runtime-version="$RUNTIME" "${spot[@]}" --scopes="$SCOPES"
	fi
	note "wait: the describe command above, every 30 s, until the state is ACTIVE"
	((DRY_RUN)) && return 0
	while :; do
		state=$(qr_state)
		case $state in
		ACTIVE) break ;;
		FAILED | SUSPENDED | "")
			die "queued resource $NAME is '${state:-gone}'; see: gcloud compute tpus queued-resources describe $NAME --project=$PROJECT --zone=$ZONE"
			;;
		esac
		echo "$(date +%H:%M:%S) $NAME: $state" >&2
		sleep 30
	done
	echo "$NAME is ACTIVE." >&2
}

cmd_setup() {
	local stage=${TMPDIR:-/tmp}/qsharp-jax-launch-$NAME
	note "setup: copy the checkout (its files that git does not ignore) to every worker and install it there"
	run mkdir -p "$stage"
	run_to "$stage/files" git -C "$ROOT" ls-files -z --cached --others --exclude-standard
	run tar -czf "$stage/code.tar.gz" -C "$ROOT" --ignore-failed-read --null --files-from="$stage/files"
	gcloud_tpu tpu-vm scp "$stage/code.tar.gz" "$NAME:qsharp-jax-code.tar.gz" --worker=all
	local data=()
	if [[ $DATA == gs://* ]]; then
		data=(--data "$DATA")
	elif [[ -n $DATA ]]; then
		run tar -czf "$stage/data.tar.gz" -C "$DATA" .
		gcloud_tpu tpu-vm scp "$stage/data.tar.gz" "$NAME:qsharp-jax-data.tar.gz" --worker=all
		data=(--data-archive ../qsharp-jax-data.tar.gz)
	fi
	[[ -n $NFS ]] && data+=(--nfs "$NFS" --nfs-mount "$NFS_MOUNT")
	gcloud_tpu tpu-vm ssh "$NAME" --worker=all --command="mkdir -p qsharp-jax && tar -xzf qsharp-jax-code.tar.gz -C qsharp-jax && cd qsharp-jax && $(quote_cmd bash launch/worker.sh setup "${data[@]}")"
}

job_command() {
	JOB=(.venv/bin/python -m "qsharp_jax.$MODULE")
	[[ $MODULE == train ]] && JOB+=("--config=$CONFIG" "--config.output_dir=$OUTPUT_DIR")
	[[ $MODULE == train && -n $NFS ]] && JOB+=("--config.learner.checkpoint_dir=$NFS_MOUNT/$NAME/guide")
	JOB+=("${EXTRA[@]}")
}

cmd_run() {
	job_command
	local gcs=()
	[[ -n $BUCKET ]] && gcs=(--bucket "$GCS" --sync-every "$SYNC_EVERY")
	note "run: python ${JOB[*]:1} on all $HOSTS worker(s) (detached; log in qsharp-jax/logs/$NAME.log)"
	ssh_worker all bash launch/worker.sh run --job "$NAME" --output-dir "$OUTPUT_DIR" --hosts "$HOSTS" "${gcs[@]}" \
		-- "${JOB[@]}"
}

cmd_logs() {
	note "logs: worker $WORKER's log until the job ends (Ctrl-C stops streaming, not the job)"
	ssh_worker "$WORKER" bash launch/worker.sh logs --job "$NAME"
}

cmd_stop() {
	note "stop: SIGTERM the job on every worker (the learner saves first)"
	ssh_worker all bash launch/worker.sh stop --job "$NAME"
}

cmd_copy() {
	note "copy: worker 0's $OUTPUT_DIR and log to $GCS"
	ssh_worker 0 bash launch/worker.sh sync --job "$NAME" --output-dir "$OUTPUT_DIR" --bucket "$GCS"
	run gcloud storage ls "$GCS/"
}

cmd_delete() {
	note "delete: the queued resource $NAME and its TPU VM"
	gcloud_tpu queued-resources delete "$NAME" --force --quiet
}

cmd_launch() {
	cmd_create
	cmd_setup
	cmd_run
	local status=0
	cmd_logs || status=$?
	if ((status != 0)); then
		echo "the job ended with status $status (or the VM was lost: a preempted spot VM); rerun this same command to resume from $GCS." >&2
	fi
	cmd_copy || echo "copy failed (was the VM preempted?): worker 0's last periodic copy is in $GCS." >&2
	if ((status == 0 && !KEEP)); then
		cmd_delete
	else
		echo "kept $NAME; delete it with: bash launch/tpu_vm.sh delete --project $PROJECT --zone $ZONE --name $NAME" >&2
	fi
	return "$status"
}

main() {
	parse_args "$@"
	validate
	"cmd_$COMMAND"
}

main "$@"
