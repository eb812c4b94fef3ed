#!/usr/bin/env bash
# A Docker engine and a base image for the locally built stack (docker/docker-compose.local.yml),
# on a machine with no container registry.
#
#   bash docker/dev-engine.sh up       # engine answering + base image present (idempotent)
#   bash docker/dev-engine.sh status   # what is there; exit 0 when both are ready
#   bash docker/dev-engine.sh down     # stop the dockerd this script started (nothing else)
#
# `up` reuses an engine that already answers (DOCKER_HOST or the default socket) and never
# stops it. Without one, as root, it installs what is missing from Debian's packages (docker.io,
# docker-compose, debootstrap) and starts dockerd with no bridge and no iptables rules:
# containers get no addresses of their own and run with host networking only. The base image
# (Debian bookworm, minbase + python3) is made with debootstrap and `docker import`, as no
# registry can be pulled from; images and layers stay under the data root between runs.
#
# Exit codes: 0 ready; 3 no engine can be started here (the reason is printed on stderr);
# anything else is a fault of this script.
#
# Settings (environment):
#   DNS_DOCKER_ROOT    data root of a dockerd started here (default /var/lib/dns-milvus-docker)
#   DNS_DOCKER_RUN     its pid file, exec root and log (default /run/dns-milvus-docker)
#   DNS_BASE_IMAGE     name of the base image (default dns-milvus/base:bookworm)
#   DNS_DEBIAN_MIRROR  Debian mirror for debootstrap (default: the first one apt uses)
set -euo pipefail

ROOT=${DNS_DOCKER_ROOT:-/var/lib/dns-milvus-docker}
RUN=${DNS_DOCKER_RUN:-/run/dns-milvus-docker}
BASE_IMAGE=${DNS_BASE_IMAGE:-dns-milvus/base:bookworm}
SUITE=bookworm
PIDFILE="$RUN/dockerd.pid"
LOG="$RUN/dockerd.log"
SOCKET=/var/run/docker.sock

say() { echo "dev-engine: $*"; }
unavailable() {
  echo "dev-engine: no Docker engine here: $*" >&2
  exit 3
}

engine_answers() { timeout 20 docker info >/dev/null 2>&1; }

# The pid of the dockerd this script started, if it still runs.
our_dockerd() {
  local pid
  [ -s "$PIDFILE" ] || return 1
  pid=$(cat "$PIDFILE")
  [ -n "$pid" ] && [ -d "/proc/$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dockerd ] || return 1
  echo "$pid"
}

compose_command() {
  if docker compose version >/dev/null 2>&1; then
    echo "docker compose"
  elif command -v docker-compose >/dev/null 2>&1; then
    echo "docker-compose"
  else
    return 1
  fi
}

install_packages() {
  local missing=()
  command -v docker >/dev/null 2>&1 && command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
  compose_command >/dev/null 2>&1 || missing+=(docker-compose)
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || unavailable "missing ${missing[*]} and not root to install them"
  command -v apt-get >/dev/null 2>&1 || unavailable "missing ${missing[*]} and no apt-get to install them"
  say "installing ${missing[*]} (Debian packages)"
  # Installing docker.io must not start a system daemon (it would make the default bridge):
  # a policy-rc.d that forbids starting services, only for the length of the install.
  local policy=/usr/sbin/policy-rc.d made_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
  fi
  local rc=0
  { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
    >"$RUN/apt.log" 2>&1 || rc=$?
  [ $made_policy = 1 ] && rm -f "$policy"
  [ $rc = 0 ] || unavailable "apt-get install ${missing[*]} failed: $(tail -n 3 "$RUN/apt.log" | tr '\n' ' ')"
}

start_dockerd() {
  [ "$(id -u)" = 0 ] || unavailable "no engine answers and starting dockerd needs root"
  if [ -S "$SOCKET" ] && ! our_dockerd >/dev/null; then
    # A socket nobody answers on: a daemon that died. Refuse to take over a live one's socket.
    if pgrep -x dockerd >/dev/null 2>&1; then
      unavailable "a dockerd runs but does not answer on $SOCKET"
    fi
  fi
  mkdir -p "$ROOT/data" "$RUN/exec"
  say "starting dockerd (data root $ROOT/data, no bridge, no iptables, host networking only)"
  # setsid: the daemon outlives this script and gets no signal meant for the caller's terminal;
  # 9>&-: it must not inherit the lock of `up` (it would hold it for as long as it runs).
  setsid dockerd \
    --data-root "$ROOT/data" \
    --exec-root "$RUN/exec" \
    --pidfile "$PIDFILE" \
    --host "unix://$SOCKET" \
    --bridge=none --iptables=false --ip-masq=false \
    --log-level=warn \
    </dev/null >"$LOG" 2>&1 9>&- &
  local pid=$! waited=0
  until engine_answers; do
    if ! kill -0 "$pid" 2>/dev/null; then
      unavailable "dockerd exited at start: $(tail -n 3 "$LOG" | tr '\n' ' ')"
    fi
    waited=$((waited + 1))
    if [ $waited -ge 60 ]; then
      kill "$pid" 2>/dev/null || true
      unavailable "dockerd did not answer within 60 s: $(tail -n 3 "$LOG" | tr '\n' ' ')"
    fi
    sleep 1
  done
  say "dockerd answers (pid $(cat "$PIDFILE"))"
}

debian_mirror() {
  if [ -n "${DNS_DEBIAN_MIRROR:-}" ]; then
    echo "$DNS_DEBIAN_MIRROR"
    return
  fi
  local uri
  uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
    awk '/^URIs:/ && $2 ~ /debian\/?$/ {print $2; exit}')
  [ -n "$uri" ] || uri=$(awk '$1 == "deb" && $3 ~ /^[a-z]+$/ && $2 ~ /debian\/?$/ {print $2; exit}' \
    /etc/apt/sources.list 2>/dev/null)
  echo "${uri:-http://deb.debian.org/debian}"
}

# Unmount whatever debootstrap left mounted under $1 (proc, sys), deepest first.
unmount_under() {
  local dir=$1 mount
  awk -v d="$dir/" 'index($2 "/", d) == 1 {print $2}' /proc/mounts | sort -r |
    while read -r mount; do umount -l "$mount" 2>/dev/null || true; done
}

make_base_image() {
  docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 && return 0
  command -v debootstrap >/dev/null 2>&1 || unavailable "no debootstrap to make the base image"
  [ "$(id -u)" = 0 ] || unavailable "making the base image with debootstrap needs root"
  local work mirror started
  started=$(date +%s)
  mirror=$(debian_mirror)
  work=$(mktemp -d "${TMPDIR:-/tmp}/dns-base.XXXXXX")
  # shellcheck disable=SC2064  # expand now: the trap must clean this directory
  trap "unmount_under '$work'; rm -rf --one-file-system '$work'" EXIT
  say "making $BASE_IMAGE: debootstrap --variant=minbase $SUITE from $mirror (about 2 minutes)"
  if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$work/root" "$mirror" >"$RUN/debootstrap.log" 2>&1; then
    unavailable "debootstrap failed: $(tail -n 3 "$RUN/debootstrap.log" | tr '\n' ' ')"
  fi
  unmount_under "$work"
  # What an image does not need: downloaded packages, package lists, documentation, locales.
  (
    cd "$work/root"
    rm -rf var/cache/apt/archives/*.deb var/cache/apt/*.bin var/lib/apt/lists/* \
      usr/share/doc/* usr/share/man/* usr/share/info/*
    find usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
  )
  local python
  python=$(chroot "$work/root" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  tar --numeric-owner -C "$work/root" -c . |
    docker import \
      --change 'ENV LANG=C.UTF-8' \
      --change "LABEL org.dns-milvus.base.suite=$SUITE org.dns-milvus.base.python=$python" \
      --message "debootstrap --variant=minbase $SUITE + python3, python3-venv, ca-certificates" \
      - "$BASE_IMAGE" >/dev/null
  unmount_under "$work"
  rm -rf --one-file-system "$work"
  trap - EXIT
  say "made $BASE_IMAGE (python $python) in $(($(date +%s) - started)) s"
}

cmd_up() {
  local started
  started=$(date +%s)
  mkdir -p "$RUN" 2>/dev/null || true
  if [ -w "$RUN" ]; then # one `up` at a time (others wait); no lock where we may not write
    exec 9>"$RUN/lock"
    flock -w 600 9 || unavailable "another dev-engine.sh holds $RUN/lock"
  fi
  install_packages
  if engine_answers; then
    if pid=$(our_dockerd); then say "dockerd already running (pid $pid, started by this script)"; else
      say "using the engine that already answers"; fi
  else
    start_dockerd
  fi
  compose_command >/dev/null || unavailable "no compose command (docker compose or docker-compose)"
  make_base_image
  say "ready in $(($(date +%s) - started)) s: engine $(docker version -f '{{.Server.Version}}'), compose: $(compose_command), base $BASE_IMAGE"
}

cmd_down() {
  local pid waited=0
  if ! pid=$(our_dockerd); then
    say "no dockerd started by this script is running; nothing to stop"
    return 0
  fi
  say "stopping dockerd (pid $pid); its containers stop with it"
  kill -TERM "$pid"
  while [ -d "/proc/$pid" ]; do
    waited=$((waited + 1))
    if [ $waited -ge 60 ]; then
      say "dockerd still running after 60 s: killing it"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 1
      break
    fi
    sleep 1
  done
  rm -f "$PIDFILE"
  say "stopped"
}

cmd_status() {
  local ok=0
  if engine_answers; then
    if pid=$(our_dockerd); then say "engine: answers (dockerd pid $pid, started by this script)"; else
      say "engine: answers (not started by this script)"; fi
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then say "base image: $BASE_IMAGE"; else
      say "base image: $BASE_IMAGE missing"; ok=1; fi
  else
    say "engine: none answers"
    ok=1
  fi
  compose=$(compose_command) && say "compose: $compose" || { say "compose: none"; ok=1; }
  return $ok
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *)
    echo "usage: $0 up|down|status" >&2
    exit 2
    ;;
esac
