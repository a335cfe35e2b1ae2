#!/bin/bash
# Install what the kvmexit lab needs; print the lab kernel's image path.
#
#   tests/lab/setup.sh            (as root; Debian 12)
#
# The lab (tests/lab/run) boots Debian's own kernel under QEMU's emulator,
# with an emulated AMD CPU, because that is how a KVM that really fires
# kvm:kvm_exit is had on a machine whose KVM does not.  This installs:
#   - linux-headers-amd64 (bcc in the lab compiles against it) and the
#     linux-image-* it is for: the lab kernel must match those headers;
#   - qemu-system-x86 and busybox-static, which virtme-ng boots with (the
#     lab sees this root, so its qemu-system-x86_64 is also the real VMM
#     that tests/lab/qemu_vm.py runs, with KVM, inside the lab);
#   - virtme-ng (vng) from PyPI into a venv, $KVMEXIT_LAB_VENV
#     (default /opt/kvmexit-lab/venv), that sees the system's packages;
#   - /lib/modules/$(uname -r)/{build,source} links to those headers, when
#     the running kernel has no headers of its own, so bcc works here too.
# Idempotent: when all is in place it only checks, in well under a second.
# Its only stdout is the kernel image path, e.g. /boot/vmlinuz-6.1.0-56-amd64;
# progress goes to stderr.

set -euo pipefail

VENV=${KVMEXIT_LAB_VENV:-/opt/kvmexit-lab/venv}
VNG_VERSION=1.42
export DEBIAN_FRONTEND=noninteractive

LAB_NAME="lab"
# shellcheck source=setup_lib.sh
source "$(dirname "$0")/setup_lib.sh"

# Sets $release, the lab kernel's.
install_packages() {
    apt_install linux-headers-amd64
    release=$(headers_release)
    [ -n "$release" ] || die "cannot tell which kernel linux-headers-amd64 is for"
    # Recommends would drag firmware and daemons into a kernel only booted
    # under QEMU.
    apt_install --no-install-recommends "linux-image-$release"
    apt_install qemu-system-x86 busybox-static
    [ -e "/boot/vmlinuz-$release" ] || die "/boot/vmlinuz-$release is missing"
}

install_vng() {
    local have
    have=$("$VENV/bin/python3" -c \
        'import importlib.metadata as m; print(m.version("virtme-ng"))' \
        2>/dev/null || true)
    [ "$have" = "$VNG_VERSION" ] && return
    if [ ! -x "$VENV/bin/python3" ]; then
        apt_install python3-venv
        log "creating venv $VENV"
        # bcc's Python module exists for Debian's /usr/bin/python3 only, and
        # the system packages must stay visible to whatever runs from here.
        /usr/bin/python3 -m venv --system-site-packages "$VENV" >&2
    fi
    log "installing virtme-ng==$VNG_VERSION into $VENV"
    "$VENV/bin/pip" install -q "virtme-ng==$VNG_VERSION" >&2
}

# bcc looks for headers in /lib/modules/$(uname -r)/build.  A kernel without
# a headers package (like this machine kind's own) gets Debian's 6.1 ones,
# which work for the tracepoint and kernel structures kvmexit reads.
link_host_headers() {
    local dir
    dir=/lib/modules/$(uname -r)
    [ -e "$dir/build" ] && return
    log "linking $dir/build and source to the linux-headers-$release files"
    mkdir -p "$dir"
    ln -sfn "/usr/src/linux-headers-$release" "$dir/build"
    ln -sfn "/usr/src/linux-headers-${release%-amd64}-common" "$dir/source"
}

main() {
    [ "$(id -u)" = 0 ] || die "must run as root (it installs packages)"
    install_packages
    install_vng
    link_host_headers
    echo "/boot/vmlinuz-$release"
}

main "$@"
