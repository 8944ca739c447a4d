#!/usr/bin/env bash
# Build the owl_deploy server image without a Docker daemon or an image registry, run it, and smoke-test it.
#
#   docker/build.sh                  # or: make image
#
# 1. base:  a Debian bookworm root filesystem from Debian's packages (mmdebstrap: minbase + python3.11 +
#           python3.11-venv + ca-certificates), imported as $BASE_IMAGE; reused while its recipe is unchanged.
# 2. image: `buildah bud --isolation chroot` of docker/Dockerfile ($IMAGE); layers cached (--layers).
# 3. smoke: `podman run` of the image (its ENTRYPOINT: owl-deploy serve /deploy) on the host's network, with
#           $DEPLOY mounted read-only at /deploy; waits for GET /health = 200, runs the image's HEALTHCHECK,
#           POSTs a real /v1/completions request over loopback, prints the answer, stops the server with
#           SIGTERM and checks that it exits 0.
# 4. size:  prints the image's size.
#
# Environment: IMAGE, BASE_IMAGE, DEPLOY (deployment folder; default docker/deploy), PORT (loopback port of
# the smoke run; default 18000), SERVE_ARGS (extra `owl-deploy serve` options of the smoke run; default
# "--max-batch 2": fewer batch sizes to compile), PROMPT, CHAT_PROMPT, MAX_TOKENS, SMOKE=0 (build only),
# OCI_RUNTIME (podman's runtime; default runc when installed), DEBIAN_MIRROR, DEBIAN_SECURITY_MIRROR,
# HEALTH_TIMEOUT (seconds; default 900), PIP_CA (CA bundle for pip during the build; default the host's
# /etc/ssl/certs/ca-certificates.crt). To refresh the base (Debian updates): buildah rmi $BASE_IMAGE.
# Needs root, buildah, mmdebstrap, podman, curl: apt-get install -y buildah mmdebstrap podman runc curl
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

IMAGE=${IMAGE:-localhost/owl-deploy:serve}
BASE_IMAGE=${BASE_IMAGE:-localhost/owl-deploy-base:bookworm}
DEPLOY=${DEPLOY:-docker/deploy}
PORT=${PORT:-18000}
SERVE_ARGS=${SERVE_ARGS:---max-batch 2}
PROMPT=${PROMPT:-The capital of France is}
CHAT_PROMPT=${CHAT_PROMPT:-What is the capital of France?}
MAX_TOKENS=${MAX_TOKENS:-16}
SMOKE=${SMOKE:-1}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-900}
# CA bundle that pip uses inside the build (a build secret, in no layer): the host's trust store, which
# knows the TLS-intercepting proxy between this machine and PyPI, if there is one. PIP_CA= turns it off.
PIP_CA=${PIP_CA-/etc/ssl/certs/ca-certificates.crt}
SMOKE_NAME=owl-deploy-smoke-$$

die() { echo "docker/build.sh: error: $*" >&2; exit 1; }
say() { echo "==> $*" >&2; }
need() { command -v "$1" >/dev/null 2>&1 || die "$1 not found (apt-get install -y $2)"; }

[ "$(id -u)" = 0 ] || die "run as root (mmdebstrap and buildah's chroot isolation need it)"
need buildah buildah
need mmdebstrap mmdebstrap
need podman podman
need python3 python3
[ "$SMOKE" = 0 ] || need curl curl
[ -z "$PIP_CA" ] || [ -s "$PIP_CA" ] || die "PIP_CA=$PIP_CA is not a file (PIP_CA= to use the image's own CAs)"

# The deployment folder of the smoke run, checked before anything is built.
if [ "$SMOKE" != 0 ] && [ ! -f "$DEPLOY/model.onnx" ]; then
    if [ "$DEPLOY" != docker/deploy ] || [ ! -x .venv/bin/owl-deploy ]; then
        die "no deployment folder at $DEPLOY (set DEPLOY=... or see docker/README.md)"
    fi
    say "no deployment folder at $DEPLOY: exporting SmolLM2-135M with the repository's venv"
    .venv/bin/owl-deploy export --model smollm2-135m --out "$DEPLOY" --sequence-length 256 --greedy-tokens 8
fi

# --- 1. the base image --------------------------------------------------------------------------------------
# Everything that decides the base's contents; the image carries its hash as a label, so a change rebuilds it.
BASE_PACKAGES=python3.11,python3.11-venv,ca-certificates
# shellcheck disable=SC2016  # "$1" in the customize hook is the root filesystem, given by mmdebstrap
MMDEBSTRAP_ARGS=(
    --variant=minbase --include="$BASE_PACKAGES"
    # merged /usr through the hook instead of the usrmerge package (which would pull in perl, ~50 MB)
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*'
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/doc/*'
    --dpkgopt='path-include=/usr/share/doc/*/copyright'
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/log/*.log'
    bookworm
)
# bookworm with its point-release and security updates (the mirrors are not part of the recipe's hash)
SOURCES=(
    "deb $DEBIAN_MIRROR bookworm main"
    "deb $DEBIAN_MIRROR bookworm-updates main"
    "deb $DEBIAN_SECURITY_MIRROR bookworm-security main"
)
BASE_KEY=$(printf '%s\n' v2 "${MMDEBSTRAP_ARGS[@]}" updates security | sha256sum | cut -c1-16)

base_key_of() {
    buildah inspect --type image --format '{{index .OCIv1.Config.Labels "org.owl-deploy.base-key"}}' "$1" 2>/dev/null
}

T0=$SECONDS
if [ "$(base_key_of "$BASE_IMAGE" || true)" = "$BASE_KEY" ]; then
    say "base image $BASE_IMAGE is up to date (recipe $BASE_KEY): reused"
    BASE_SECONDS=0
else
    say "base image $BASE_IMAGE: mmdebstrap bookworm (+ updates, security; $BASE_PACKAGES) from $DEBIAN_MIRROR"
    WORK=$(mktemp -d /tmp/owl-deploy-base.XXXXXX)
    trap 'rm -rf "$WORK"' EXIT
    mmdebstrap --quiet "${MMDEBSTRAP_ARGS[@]}" "$WORK/rootfs.tar" "${SOURCES[@]}" \
        || die "mmdebstrap failed (are $DEBIAN_MIRROR and $DEBIAN_SECURITY_MIRROR reachable?)"
    ctr=$(buildah from scratch)
    buildah add --quiet "$ctr" "$WORK/rootfs.tar" / >/dev/null
    buildah config \
        --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
        --cmd /bin/bash --os linux --arch amd64 \
        --label org.owl-deploy.base-key="$BASE_KEY" \
        --label org.opencontainers.image.description="Debian bookworm minbase + python3.11 (mmdebstrap)" \
        "$ctr"
    buildah commit --quiet --format docker --rm "$ctr" "$BASE_IMAGE" >/dev/null
    rm -rf "$WORK"
    trap - EXIT
    BASE_SECONDS=$((SECONDS - T0))
    say "base image built in ${BASE_SECONDS} s"
fi

# --- 2. the server image -------------------------------------------------------------------------------------
say "building $IMAGE (buildah bud --isolation chroot, docker/Dockerfile)"
T1=$SECONDS
# --format docker keeps HEALTHCHECK (the OCI image format has no such field)
SECRETS=()
[ -z "$PIP_CA" ] || SECRETS=(--secret "id=pip_ca,src=$PIP_CA")
buildah bud --isolation chroot --format docker --layers --force-rm "${SECRETS[@]}" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" -f docker/Dockerfile -t "$IMAGE" . \
    || die "buildah bud failed"
BUILD_SECONDS=$((SECONDS - T1))
say "image built in ${BUILD_SECONDS} s (base: ${BASE_SECONDS} s)"

# --- 3. the smoke run ----------------------------------------------------------------------------------------
if [ "$SMOKE" != 0 ]; then
    DEPLOY_ABS=$(cd "$DEPLOY" && pwd)
    URL=http://127.0.0.1:$PORT

    # podman's runtime: runc when installed (crun 1.8 of bookworm refuses a host whose cgroups are in hybrid
    # mode). The container gets the caller's open-files limit and a process limit of at most 32768: podman's
    # defaults (1048576 / 4194304) need CAP_SYS_RESOURCE to raise, which a sandboxed root may lack.
    PODMAN=(podman)
    OCI_RUNTIME=${OCI_RUNTIME:-$(command -v runc || true)}
    if [ -n "$OCI_RUNTIME" ]; then PODMAN+=(--runtime "$OCI_RUNTIME"); fi
    # podman schedules HEALTHCHECKs with systemd timers; without systemd it logs an error at each start and
    # stop (the checks themselves run below with `podman healthcheck run`): those lines are dropped.
    pod() { "${PODMAN[@]}" "$@" 2> >(grep -v 'unable to get systemd connection' >&2); }
    NPROC=$(ulimit -Hu)
    if [ "$NPROC" = unlimited ] || [ "$NPROC" -gt 32768 ]; then NPROC=32768; fi
    RUN_ARGS=(--network host --ulimit "nofile=$(ulimit -Sn):$(ulimit -Hn)" --ulimit "nproc=$NPROC:$NPROC")

    say "checking the install inside the image: no torch, pip check"
    pod run --rm "${RUN_ARGS[@]}" --entrypoint python "$IMAGE" -c '
import importlib.util, os, subprocess, sys
assert importlib.util.find_spec("torch") is None, "torch is installed"
subprocess.run([sys.executable, "-m", "pip", "check"], check=True)
print(f"uid {os.getuid()}: torch absent, pip check ok")' || die "the install inside $IMAGE is not as expected"

    port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }
    ! port_busy || die "port $PORT on 127.0.0.1 is in use (set PORT=...)"

    cleanup() { pod rm --force --ignore "$SMOKE_NAME" >/dev/null 2>&1 || true; }
    trap cleanup EXIT
    say "starting $IMAGE: owl-deploy serve /deploy (= $DEPLOY) on $URL $SERVE_ARGS"
    # shellcheck disable=SC2086  # SERVE_ARGS is a list of options
    pod run --detach --name "$SMOKE_NAME" "${RUN_ARGS[@]}" \
        -v "$DEPLOY_ABS:/deploy:ro" -e OWL_HEALTH_URL="$URL/health" \
        "$IMAGE" --host 127.0.0.1 --port "$PORT" $SERVE_ARGS >/dev/null \
        || die "podman run failed"

    T2=$SECONDS
    while :; do
        health=$(curl -s -w ' %{http_code}' "$URL/health" || true)
        code=${health##* }
        [ "$code" = 200 ] && break
        case "$health" in *'"failed"'*) die "the server could not load the deployment: ${health% *}" ;; esac
        if [ "$(pod inspect --format '{{.State.Running}}' "$SMOKE_NAME")" != true ]; then
            pod logs "$SMOKE_NAME" >&2 || true
            die "the server exited before /health was 200"
        fi
        [ $((SECONDS - T2)) -lt "$HEALTH_TIMEOUT" ] || {
            pod logs "$SMOKE_NAME" >&2 || true
            die "/health not 200 after ${HEALTH_TIMEOUT} s (last: $code)"
        }
        sleep 3
    done
    READY_SECONDS=$((SECONDS - T2))
    say "/health = 200 after ${READY_SECONDS} s"
    pod healthcheck run "$SMOKE_NAME" >/dev/null || die "the image's HEALTHCHECK failed on a ready server"
    say "the image's HEALTHCHECK passes"

    MODEL_NAME=$(curl -sS --fail "$URL/v1/models" \
        | python3 -c 'import json, sys; print(json.load(sys.stdin)["data"][0]["id"])')
    # ask PATH JSON: POST it, print the raw response and the answer; fail on an HTTP error or an empty answer
    ask() {
        local response t=$SECONDS
        say "POST $URL$1 $2"
        response=$(curl -sS --fail-with-body -H 'Content-Type: application/json' -d "$2" "$URL$1") \
            || die "POST $1 failed: $response"
        echo "$response"
        python3 -c '
import json, sys
r = json.loads(sys.argv[1])
c = r["choices"][0]
text = c["message"]["content"] if "message" in c else c["text"]
assert text.strip(), "empty answer"
n, why = r["usage"]["completion_tokens"], c["finish_reason"]
print(f"answer ({n} tokens, finish_reason {why}, {sys.argv[2]} s): {text!r}")
' "$response" "$((SECONDS - t))" || die "unexpected response to POST $1"
    }
    ask /v1/completions "$(python3 -c 'import json, sys; print(json.dumps({"model": sys.argv[1], "prompt": sys.argv[2],
        "max_tokens": int(sys.argv[3]), "temperature": 0}))' "$MODEL_NAME" "$PROMPT" "$MAX_TOKENS")"
    # the chat endpoint renders the deployment's chat template (jinja2), when the folder has one
    if [ -f "$DEPLOY/chat_template.jinja" ] \
        || grep -q '"chat_template"' "$DEPLOY/tokenizer_config.json" 2>/dev/null; then
        ask /v1/chat/completions "$(python3 -c 'import json, sys; print(json.dumps({"model": sys.argv[1],
            "messages": [{"role": "user", "content": sys.argv[2]}], "max_tokens": int(sys.argv[3]),
            "temperature": 0}))' "$MODEL_NAME" "$CHAT_PROMPT" "$MAX_TOKENS")"
    fi

    say "SIGTERM to the server (podman stop: SIGTERM, SIGKILL only after 120 s)"
    T4=$SECONDS
    pod stop --time 120 "$SMOKE_NAME" >/dev/null
    EXIT_CODE=$(pod inspect --format '{{.State.ExitCode}}' "$SMOKE_NAME")
    pod logs "$SMOKE_NAME" 2>&1 | tail -n 4 >&2 || true
    [ "$EXIT_CODE" = 0 ] || die "the server exited with status $EXIT_CODE after SIGTERM"
    say "the server exited with status 0 after SIGTERM ($((SECONDS - T4)) s)"
    cleanup
    trap - EXIT
fi

# --- 4. size -------------------------------------------------------------------------------------------------
BYTES=$(podman image inspect --format '{{.Size}}' "$IMAGE")
BASE_BYTES=$(podman image inspect --format '{{.Size}}' "$BASE_IMAGE" 2>/dev/null || echo 0)
python3 -c 'import sys
name, b, base = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
print(f"image {name}: {b / 1e6:.0f} MB ({b / 2**20:.0f} MiB); base {base / 1e6:.0f} MB")' \
    "$IMAGE" "$BYTES" "$BASE_BYTES"
say "build times: base ${BASE_SECONDS} s, image ${BUILD_SECONDS} s"
