# Shell helpers that tests/lab/setup.sh and tests/lab/intel_setup.sh
# share; sourced, with LAB_NAME set to what log lines are prefixed with.

log() { echo "$LAB_NAME setup: $*" >&2; }
die() { log "error: $*"; exit 1; }

installed() {
    [ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null)" = "ii " ]
}

apt_updated=
# apt_install [apt-get options] PACKAGE...: install those not yet installed.
apt_install() {
    local opts=() missing=() p
    for p in "$@"; do
        case $p in
        -*) opts+=("$p") ;;
        *) installed "$p" || missing+=("$p") ;;
        esac
    done
    [ ${#missing[@]} -eq 0 ] && return
    if [ -z "$apt_updated" ]; then
        log "apt-get update"
        apt-get update -q >&2
        apt_updated=1
    fi
    log "installing ${missing[*]}"
    apt-get install -y -q "${opts[@]}" "${missing[@]}" >&2
}

# The release (e.g. 6.1.0-56-amd64) that linux-headers-amd64 pulls in.
headers_release() {
    dpkg-query -W -f='${Depends}' linux-headers-amd64 |
        grep -o 'linux-headers-[^ ,]*-amd64' | head -n1 |
        sed 's/^linux-headers-//'
}
