#!/bin/bash
# Install what the Intel (VMX) lab needs; print the lab kernel's image path.
#
#   tests/lab/intel_setup.sh       (as root; Debian 12)
#
# QEMU's emulator has no VMX, Bochs has: tests/lab/intel.py boots Debian's
# 6.1 kernel in Bochs (an emulated Intel CPU with VMX, EPT, unrestricted
# guest), so kvm_intel runs there and kvm:kvm_exit fires with isa=1.  This
# installs:
#   - bochs, bochsbios, vgabios: the emulator and its BIOS images;
#   - grub-pc-bin, xorriso, mtools: Bochs cannot load a kernel directly, so
#     intel.py boots a GRUB rescue ISO (grub-mkrescue) holding it;
#   - busybox-static: the initramfs that mounts the root image;
#   - linux-headers-amd64 and the linux-image-* it is for (bcc inside
#     compiles against those headers), python3-bpfcc and python3-numpy,
#     whose files intel.py copies into the lab's root image.
# Idempotent: when all is in place it only checks, in well under a second.
# Its only stdout is the kernel image path; progress goes to stderr.

set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

LAB_NAME="intel lab"
# shellcheck source=setup_lib.sh
source "$(dirname "$0")/setup_lib.sh"

main() {
    [ "$(id -u)" = 0 ] || die "must run as root (it installs packages)"
    apt_install linux-headers-amd64
    release=$(headers_release)
    [ -n "$release" ] || die "cannot tell which kernel linux-headers-amd64 is for"
    # Recommends would drag firmware, X11 front ends and daemons into what
    # only runs headless.
    apt_install --no-install-recommends "linux-image-$release" \
        bochs bochsbios vgabios grub-pc-bin xorriso mtools busybox-static \
        python3-bpfcc python3-numpy kmod
    [ -e "/boot/vmlinuz-$release" ] || die "/boot/vmlinuz-$release is missing"
    command -v bochs >/dev/null || die "bochs is not on PATH"
    echo "/boot/vmlinuz-$release"
}

main "$@"
