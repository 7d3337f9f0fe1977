#!/usr/bin/env bash
# Verify that the fedpower edge client runs on aarch64 (Raspberry Pi OS 64-bit / Debian bookworm arm64),
# on an x86_64 Debian host, under qemu user-mode emulation. Run by hand as root; not part of CI.
#
#   sudo scripts/edge_arm64_check.sh [all|bootstrap|install|round|shell|clean]
#
#   bootstrap  debootstrap an arm64 bookworm userland (minbase + python3 + venv) into $ARM64_ROOT  (6-20 min)
#   install    venv in the userland; the aarch64 torch wheel from PyPI ($TORCH_SPEC); fedpower base install (7-45 min)
#   round      native SuperLink on 127.0.0.1 + emulated flower-supernode (QEMU_CPU, default cortex-a72 = Pi 4;
#              use cortex-a76 for a Pi 5) + one `flwr run` of PowerSGD shared int8; checks the server got the
#              client's reply
#   all        the three above (each stage is skipped when its marker file says it is done)
#   shell      an interactive emulated shell in the userland (mounts undone on exit)
#   exec CMD   run one command in the userland, e.g.  exec python -c 'import torch'  (QEMU_CPU applies)
#   clean      delete $ARM64_ROOT
#
# Environment: ARM64_ROOT (default /var/tmp/fedpower-arm64; never inside the repository),
# QEMU_CPU (default cortex-a72), MIRROR (default http://deb.debian.org/debian), TORCH_SPEC (default torch==2.9.1: the
# newest PyPI torch whose aarch64 wheel is CPU-only and runs on a Pi 4's Cortex-A72; see docs/edge.md),
# HOST_VENV (default <repo>/.venv: the native SuperLink/ServerApp side, needs the [sim] install of this repo),
# ROUNDS (default 1), PORT (SuperLink port, default 9180).
#
# Host changes and how they are undone (trap on EXIT): binfmt_misc is mounted only if it was not, and an
# entry named "fedpower-aarch64" is registered only if no aarch64 handler exists; both are removed again.
# /proc, /dev, /dev/pts and a small tmpfs /sys (see fake_cpu_sysfs) are mounted into the userland per stage and unmounted on exit. Servers
# listen on 127.0.0.1 only and are stopped on exit. Timings are appended to $ARM64_ROOT/timings.txt.
set -euo pipefail

REPO="${FEDPOWER_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
ARM64_ROOT="${ARM64_ROOT:-/var/tmp/fedpower-arm64}"
QEMU_CPU="${QEMU_CPU:-cortex-a72}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
# 2.9.1, not the newest: PyPI's aarch64 torch >= 2.11 is a CUDA build (4.8 GB venv) and 2.10.0 dies with SIGILL
# on a Cortex-A72 (measured under QEMU_CPU=cortex-a72, docs/edge.md); 2.9.1 is CPU-only and ran 2 rounds there.
TORCH_SPEC="${TORCH_SPEC:-torch==2.9.1}"
HOST_VENV="${HOST_VENV:-$REPO/.venv}"
ROUNDS="${ROUNDS:-1}"
PORT="${PORT:-9180}"
CHROOT_VENV=/opt/fedpower-venv          # inside the userland
BINFMT_DIR=/proc/sys/fs/binfmt_misc
BINFMT_NAME=fedpower-aarch64
# The ELF header of an aarch64 executable (magic and mask as in qemu's binfmt configuration).
AARCH64_MAGIC='\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00'
AARCH64_MASK='\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff'

MOUNTED=()          # mount points to undo, in order of mounting
WE_MOUNTED_BINFMT=0
WE_REGISTERED=0
PIDS=()             # background processes we started
WORK=""             # host temp dir for the round

log() { printf '[edge-arm64 %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
timing() { printf '%s\t%s\t%s\n' "$(date -Is)" "$1" "$2" | tee -a "$ARM64_ROOT/timings.txt" >&2; }

cleanup() {
    local rc=$?
    set +e
    for ((i=${#PIDS[@]}-1; i>=0; i--)); do
        local pid=${PIDS[i]}
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
            kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
        fi
    done
    for ((i=${#MOUNTED[@]}-1; i>=0; i--)); do
        mountpoint -q "${MOUNTED[i]}" || continue  # debootstrap's second stage unmounts its own proc/sys
        umount "${MOUNTED[i]}" 2>/dev/null || umount -l "${MOUNTED[i]}" 2>/dev/null || log "could not unmount ${MOUNTED[i]}"
    done
    if [[ $WE_REGISTERED == 1 && -e $BINFMT_DIR/$BINFMT_NAME ]]; then echo -1 > "$BINFMT_DIR/$BINFMT_NAME"; fi
    if [[ $WE_MOUNTED_BINFMT == 1 ]]; then umount "$BINFMT_DIR" 2>/dev/null || log "could not unmount $BINFMT_DIR"; fi
    [[ -n $WORK && -d $WORK ]] && rm -rf "$WORK"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

need_root() { [[ $(id -u) == 0 ]] || die "run as root (debootstrap, chroot, mount and binfmt_misc need it)"; }

host_packages() {
    local missing=()
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
    if ((${#missing[@]})); then
        log "installing host packages: ${missing[*]}"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

# Let the kernel run aarch64 binaries through qemu (needed because every exec inside the chroot is aarch64).
enable_binfmt() {
    if ! mountpoint -q "$BINFMT_DIR"; then
        mount -t binfmt_misc binfmt_misc "$BINFMT_DIR"; WE_MOUNTED_BINFMT=1
    fi
    if grep -qs "^enabled" "$BINFMT_DIR"/qemu-aarch64 "$BINFMT_DIR/$BINFMT_NAME" 2>/dev/null; then
        log "an aarch64 binfmt handler is already registered; using it"
        return
    fi
    # F: the kernel opens the interpreter now, so it need not exist inside the chroot.
    printf ':%s:M::%s:%s:%s:F' "$BINFMT_NAME" "$AARCH64_MAGIC" "$AARCH64_MASK" "$(command -v qemu-aarch64-static)" \
        > "$BINFMT_DIR/register"
    WE_REGISTERED=1
}

mount_into() {  # mount_into TYPE_OR_BIND SOURCE TARGET
    local kind=$1 src=$2 target=$3
    mountpoint -q "$target" && return
    if [[ $kind == bind ]]; then mount --bind "$src" "$target"; else mount -t "$kind" "$src" "$target"; fi
    MOUNTED+=("$target")
}

# /sys/devices/system/cpu as an arm64 kernel presents it: the CPU lists and, for the modelled board, each
# core's MIDR_EL1 (Cortex-A72 r0p3 in a Pi 4, Cortex-A76 r4p1 in a Pi 5); as many cores as the host gives us.
fake_cpu_sysfs() {
    local root=$1/devices/system/cpu n i midr=""
    n=$(nproc)
    case "$QEMU_CPU" in cortex-a72) midr=0x00000000410fd083 ;; cortex-a76) midr=0x00000000414fd0b1 ;; esac
    mkdir -p "$root"
    for list in possible present online; do echo "0-$((n - 1))" > "$root/$list"; done
    for ((i = 0; i < n; i++)); do
        mkdir -p "$root/cpu$i/regs/identification"
        [[ -z $midr ]] || echo "$midr" > "$root/cpu$i/regs/identification/midr_el1"
    done
}

mount_chroot() {
    mount_into proc proc "$ARM64_ROOT/proc"
    # Not the host's sysfs: with its x86 CPU entries torch 2.13's aarch64 CPU detection (cpuinfo, oneDNN's
    # xbyak_aarch64) crashes `import torch` with SIGSEGV under qemu 7.2; with no /sys at all, torch imports
    # but ops that need cpuinfo fail ("Failed to initialize cpuinfo!"). Both measured. A tmpfs with the CPU
    # lists and MIDR_EL1 registers an arm64 kernel shows is enough.
    mount_into tmpfs tmpfs "$ARM64_ROOT/sys"
    fake_cpu_sysfs "$ARM64_ROOT/sys"
    mount_into bind /dev "$ARM64_ROOT/dev"
    mount_into devpts devpts "$ARM64_ROOT/dev/pts"
    # Name resolution and the host's CA bundle (HTTPS to PyPI may go through a proxy the host trusts).
    mkdir -p "$ARM64_ROOT/etc/ssl"
    cp -L /etc/resolv.conf "$ARM64_ROOT/etc/resolv.conf"
    cp -L /etc/ssl/certs/ca-certificates.crt "$ARM64_ROOT/etc/ssl/host-ca.crt"
}

# The command prefix that runs something inside the userland with a clean environment (the host's pip
# settings must not leak in). The venv's bin is first on PATH: the SuperNode starts flwr-clientapp from it.
chroot_argv() {
    CHROOT_CMD=(env -i HOME=/root LANG=C.UTF-8 TERM="${TERM:-dumb}" QEMU_CPU="$QEMU_CPU"
        PATH="$CHROOT_VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        PIP_CERT=/etc/ssl/host-ca.crt SSL_CERT_FILE=/etc/ssl/host-ca.crt REQUESTS_CA_BUNDLE=/etc/ssl/host-ca.crt
        PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 PYTHONUNBUFFERED=1
        FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_HOME=/root/.flwr
        chroot "$ARM64_ROOT")
}
in_chroot() { chroot_argv; "${CHROOT_CMD[@]}" "$@"; }

stage_bootstrap() {
    if [[ -e $ARM64_ROOT/.stage-bootstrap ]]; then log "bootstrap already done ($ARM64_ROOT)"; return; fi
    case "$ARM64_ROOT" in "$REPO"|"$REPO"/*) die "ARM64_ROOT must be outside the repository";; esac
    mkdir -p "$ARM64_ROOT"
    local t0=$SECONDS
    if [[ ! -x $ARM64_ROOT/debootstrap/debootstrap ]]; then  # first stage (native: download + unpack)
        log "debootstrap --foreign arm64 bookworm into $ARM64_ROOT"
        debootstrap --arch=arm64 --foreign --variant=minbase \
            --include=python3,python3-venv,ca-certificates bookworm "$ARM64_ROOT" "$MIRROR"
    fi
    log "second stage (emulated)"
    mount_chroot
    in_chroot /debootstrap/debootstrap --second-stage
    in_chroot /usr/bin/python3 --version
    timing bootstrap "$((SECONDS - t0)) s"
    touch "$ARM64_ROOT/.stage-bootstrap"
}

# A copy of the working tree as git sees it (tracked and untracked-not-ignored files), without build outputs.
copy_source() {
    local dest="$ARM64_ROOT/opt/fedpower-src"
    rm -rf "$dest" && mkdir -p "$dest"
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
        | xargs -0 -I{} sh -c 'test -f "{}" && printf "%s\0" "{}"' \
        | tar --null -T - -cf -) | tar -xf - -C "$dest"
}

stage_install() {
    [[ -e $ARM64_ROOT/.stage-bootstrap ]] || die "run the bootstrap stage first"
    if [[ -e $ARM64_ROOT/.stage-install ]]; then log "install already done"; return; fi
    mount_chroot
    local t0=$SECONDS
    in_chroot /usr/bin/python3 -m venv "$CHROOT_VENV"
    in_chroot pip install --no-cache-dir "$TORCH_SPEC"
    timing "install torch ($TORCH_SPEC)" "$((SECONDS - t0)) s"
    local t1=$SECONDS
    copy_source
    # The base install only: no [sim] extra, so no Ray, matplotlib or Hugging Face datasets.
    in_chroot pip install --no-cache-dir /opt/fedpower-src
    timing "install fedpower base (flwr + deps)" "$((SECONDS - t1)) s"
    in_chroot pip list --format=freeze > "$ARM64_ROOT/pip-freeze.txt"
    for banned in ray matplotlib datasets; do
        if grep -qi "^$banned==" "$ARM64_ROOT/pip-freeze.txt"; then die "base install pulled in $banned"; fi
    done
    local t2=$SECONDS
    in_chroot python -c 'import platform, torch; print(platform.machine(), torch.__version__, torch.get_num_threads())'
    timing "import torch emulated ($QEMU_CPU)" "$((SECONDS - t2)) s"
    timing "install total" "$((SECONDS - t0)) s"
    # What the board's SD card must hold: the venv, and torch's share of it.
    timing "venv size ($TORCH_SPEC)" "$(du -sm "$ARM64_ROOT$CHROOT_VENV" | cut -f1) MiB, torch $(du -sm \
        "$ARM64_ROOT$CHROOT_VENV"/lib/python3*/site-packages/torch | cut -f1) MiB"
    touch "$ARM64_ROOT/.stage-install"
}

wait_port() {  # wait_port PORT SECONDS
    for _ in $(seq "$2"); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 1
    done
    return 1
}

host_flwr() {  # the host's flwr CLI with this round's FLWR_HOME
    env PATH="$HOST_VENV/bin:$PATH" FLWR_HOME="$WORK/flwr-home" FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \
        "$HOST_VENV/bin/flwr" "$@"
}

run_status() {  # run_status RUN_ID: the run's status as `flwr ls` reports it ("" if unknown)
    host_flwr ls arm64check --format json 2>/dev/null | python3 -c '
import json, sys
text = sys.stdin.read()
rows = json.loads(text[text.index("{"):])["runs"] if "{" in text else []
print(next((r["status"] for r in rows if int(r["run-id"]) == int(sys.argv[1])), ""))' "$1" || true
}

stage_round() {
    [[ -e $ARM64_ROOT/.stage-install ]] || die "run the install stage first"
    [[ -x $HOST_VENV/bin/flower-superlink ]] || die "no flower-superlink in $HOST_VENV (make test creates it)"
    mount_chroot
    # The ClientApp code travels with the app (FAB) that `flwr run` ships; the installed package is refreshed
    # too, so that both match the working tree (--no-deps: the dependencies were installed before).
    copy_source
    in_chroot pip install --no-cache-dir --no-deps --force-reinstall --quiet /opt/fedpower-src
    log "userland: $(in_chroot uname -m), $(in_chroot python --version), QEMU_CPU=$QEMU_CPU"
    WORK=$(mktemp -d /tmp/fedpower-arm64-round.XXXXXX)
    mkdir -p "$WORK/flwr-home"
    printf '[superlink]\ndefault = "arm64check"\n\n[superlink.arm64check]\naddress = "127.0.0.1:%s"\ninsecure = true\n' \
        "$PORT" > "$WORK/flwr-home/config.toml"

    # 1. Native SuperLink on the host, as in docs/deployment.md (insecure: loopback only). The host venv's bin
    #    is on PATH because the SuperLink starts flwr-serverapp from there.
    env PATH="$HOST_VENV/bin:$PATH" FLWR_HOME="$WORK/flwr-home" FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \
        PYTHONUNBUFFERED=1 setsid "$HOST_VENV/bin/flower-superlink" --insecure --disable-runtime-dependency-installation \
        --host 127.0.0.1 --port "$PORT" > "$WORK/superlink.log" 2>&1 < /dev/null &
    PIDS+=($!)
    wait_port "$PORT" 120 || { cat "$WORK/superlink.log"; die "the SuperLink did not start"; }

    # 2. Emulated aarch64 SuperNode from the light install: one partition, its runtime API on 127.0.0.1, the
    #    per-message timing metrics on (timings=1).
    local t0=$SECONDS
    chroot_argv
    setsid "${CHROOT_CMD[@]}" flower-supernode --insecure --superlink "127.0.0.1:$PORT" \
        --node-config "partition-id=0 num-partitions=1 timings=1" --host 127.0.0.1 --port "$((PORT + 1))" \
        > "$WORK/supernode.log" 2>&1 < /dev/null &
    local supernode_pid=$!
    PIDS+=("$supernode_pid")
    # Peak RSS (VmHWM) of the emulated ClientApp processes, sampled every 0.2 s. Under qemu-user it includes the
    # emulator's own memory (translation cache), so it is an upper bound of what the process needs on a board.
    python3 - "$WORK/clientapp-peak-kib" > /dev/null 2>&1 <<'PY' &
import os, sys, time
peak = 0
while True:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if b"flwr-clientapp" in open(f"/proc/{pid}/cmdline", "rb").read():
                hwm = next(int(l.split()[1]) for l in open(f"/proc/{pid}/status") if l.startswith("VmHWM:"))
                if hwm > peak:
                    peak = hwm
                    open(sys.argv[1], "w").write(str(peak))
        except (OSError, StopIteration, ValueError):
            pass
    time.sleep(0.2)
PY
    PIDS+=($!)

    # 3. One run of the app: the deployment experiment (PowerSGD shared r4 int8) cut down to this one node and
    #    generated data (the synthetic data set needs only numpy; the base install has no mnist1d).
    local overrides="data.dataset=synthetic; data.num_clients=1; train.clients_per_round=1; train.rounds=$ROUNDS"
    local run_json run_id status="" t_run=$SECONDS
    run_json=$(cd "$REPO" && host_flwr run . arm64check --format json \
        --run-config "out-dir='$WORK/results' overrides='$overrides'") || { echo "$run_json"; die "flwr run failed"; }
    run_id=$(python3 -c 'import json,sys; t=sys.stdin.read(); print(json.loads(t[t.index("{"):])["run-id"])' \
        <<< "$run_json")
    log "run $run_id submitted; waiting (every message starts an emulated Python that imports torch)"
    for _ in $(seq 720); do   # 720 x 5 s: one hour at most
        status=$(run_status "$run_id")
        [[ $status == finished* ]] && break
        kill -0 "$supernode_pid" 2>/dev/null || { tail -50 "$WORK/supernode.log"; die "the SuperNode exited"; }
        sleep 5
    done
    local run_s=$((SECONDS - t_run)) total_s=$((SECONDS - t0))
    cp "$WORK/superlink.log" "$WORK/supernode.log" "$ARM64_ROOT/"
    [[ $status == finished:completed ]] || { tail -40 "$WORK/supernode.log"; tail -40 "$WORK/superlink.log";
        die "run $run_id ended as '${status:-unknown (timed out)}'"; }

    # 4. The server got the emulated client's update: each round aggregated exactly one reply, from partition 0.
    python3 - "$WORK/results" "$ROUNDS" <<'PY' | tee -a "$ARM64_ROOT/timings.txt"
import json, sys
from pathlib import Path
out, rounds = Path(sys.argv[1]), int(sys.argv[2])
strategy = json.loads((out / "results.json").read_text())["strategies"][0]
clients = json.loads((out / "client_metrics.json").read_text())[strategy["name"]]
assert len(strategy["rounds"]) == rounds, strategy["rounds"]
for r in strategy["rounds"]:
    assert r.get("failures", 0) == 0 and r["uplink_bytes"] > 0, r
    replies = clients[str(r["round"])]
    assert [int(c["partition-id"]) for c in replies] == [0], replies
for r in strategy["rounds"]:  # where each train message's time went on the client (clients/flower_app.py)
    c = clients[str(r["round"])][0]
    if "t-handler-s" in c:
        print(f"round {r['round']}: server round {r['seconds']:.1f} s; client: message -> handler "
              f"{c.get('t-startup-s', float('nan')):.1f} s (of it torch+fedpower imports {c['t-import-s']:.1f} s), "
              f"config {c['t-config-s']:.2f} s, data {c['t-data-s']:.2f} s, train+encode {c['t-handler-s']:.2f} s, "
              f"{int(c['t-threads'])} torch thread(s)")
print(f"OK {strategy['name']}: {rounds} round(s) aggregated from the emulated aarch64 client; "
      f"uplink {strategy['final']['uplink_bytes_total']} B, downlink {strategy['final']['downlink_bytes_total']} B, "
      f"test accuracy by round {[round(r['accuracy'], 4) for r in strategy['rounds']]}")
PY
    timing "emulated run, $ROUNDS round(s), $QEMU_CPU: SuperNode start -> run finished" "$total_s s"
    timing "emulated run, $QEMU_CPU: peak RSS of one ClientApp process (qemu included)" \
        "$(( $(cat "$WORK/clientapp-peak-kib" 2>/dev/null || echo 0) / 1024 )) MiB"
    timing "emulated run, $ROUNDS round(s), $QEMU_CPU: flwr run -> run finished" "$run_s s"
}

case "${1:-all}" in
    bootstrap) need_root; host_packages; enable_binfmt; stage_bootstrap ;;
    install) need_root; enable_binfmt; stage_install ;;
    round) need_root; enable_binfmt; stage_round ;;
    all) need_root; host_packages; enable_binfmt; stage_bootstrap; stage_install; stage_round ;;
    shell) need_root; enable_binfmt; mount_chroot; in_chroot /bin/bash -i ;;
    exec) need_root; enable_binfmt; mount_chroot; shift; in_chroot "$@" ;;
    clean) need_root; rm -rf --one-file-system "$ARM64_ROOT" ;;
    *) sed -n '2,25p' "$0"; exit 2 ;;
esac
