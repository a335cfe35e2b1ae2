#!/bin/bash
# Install and build what the arm64 lab needs; print its kernel and root.
#
#   tests/lab/arm64_setup.sh       (as root; Debian 12)
#
# QEMU's emulator runs an arm64 machine whose CPUs start at EL2
# (`-M virt,virtualization=on -cpu max`), so Debian's arm64 kernel runs KVM
# there and kvm:kvm_exit fires for arm64 guests.  This installs:
#   - qemu-system-arm (qemu-system-aarch64), the emulator;
#   - mmdebstrap (with arch-test), qemu-user-static and binfmt-support,
#     which build an arm64 Debian root on this amd64 machine (its arm64
#     programs run under qemu-aarch64 through binfmt_misc);
# and, after `dpkg --add-architecture arm64`, downloads Debian's arm64
# kernel of the same ABI as the amd64 headers (linux-image-6.1.0-NN-arm64)
# and builds, once, a root holding python3-bpfcc and python3-numpy (what
# kvmexit imports), python3-prometheus-client (for --prometheus), the
# matching linux-headers-6.1.0-NN-arm64 and
# busybox-static as an uncompressed initramfs (newc cpio) whose /init is
# INIT below.
# Results are cached under $KVMEXIT_ARM64_CACHE (default
# /var/cache/kvmexit-lab/arm64), keyed by the packages' versions and this
# recipe's: a new Debian point release builds a new root, nothing else does.
# Idempotent: when all is in place it only checks (apt-cache, no network).
# Its only stdout is two lines, the kernel image and the initramfs paths;
# progress goes to stderr.

set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

CACHE=${KVMEXIT_ARM64_CACHE:-/var/cache/kvmexit-lab/arm64}
# Bump when the root's recipe (packages, trimming, INIT) changes.
RECIPE=5
SUITE=bookworm

LAB_NAME="arm64 lab"
# shellcheck source=setup_lib.sh
source "$(dirname "$0")/setup_lib.sh"

# Kernel modules the root keeps, with what they depend on (the kernel has
# KVM and the virt machine's PCI host built in): virtio over PCI and 9p, to
# share directories with the host.
MODULES="virtio_pci 9pnet_virtio 9p"

# The initramfs's first process.  It mounts what a lab command needs and
# the host directories QEMU shares with -virtfs: tag "src" read-only, tag
# "out" writable, at the paths the kernel arguments lab.src= and lab.out=
# give (default /src and /out: a runner can give the host's own paths, so
# that paths mean the same inside).  Then, from the src directory, it runs
# lab.run= (a runner's own script), or else OUT/lab-command if there is one
# and records its status in OUT/lab-status (by hand), or else a shell on
# the console; then it powers off.
INIT='#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /sys/kernel/tracing
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
src=/src out=/out run=
for arg in $(cat /proc/cmdline); do
    case $arg in
    lab.src=*) src=${arg#lab.src=} ;;
    lab.out=*) out=${arg#lab.out=} ;;
    lab.run=*) run=${arg#lab.run=} ;;
    esac
done
for m in virtio_pci 9pnet_virtio 9p; do modprobe $m; done
mkdir -p "$src" "$out"
mount -t 9p -o trans=virtio,version=9p2000.L,ro src "$src" 2>/dev/null
mount -t 9p -o trans=virtio,version=9p2000.L out "$out" 2>/dev/null
cd "$src" 2>/dev/null || cd /
if [ -n "$run" ]; then
    "$run"
elif [ -x "$out/lab-command" ]; then
    "$out/lab-command"
    echo $? > "$out/lab-status"
else
    setsid cttyhack sh -l
fi
sync
poweroff -f
'

# The Debian mirrors this machine's apt uses (deb822 or one-line sources),
# so that the root comes from the same archive and snapshot as the host.
mirror_of() {
    local path=$1
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        /etc/apt/sources.list.d/*.sources 2>/dev/null |
        grep -v '^ *#' | grep -oE "https?://[^ ]*/${path}/?( |$)" |
        head -n1 | tr -d ' ' | sed 's:/$::' || true
}

# Sets $versions: "PACKAGE VERSION" lines, the candidates of the packages
# the lab takes from Debian (one apt-cache run: each takes seconds).
read_versions() {
    versions=$(apt-cache policy python3-bpfcc python3-numpy:arm64 \
        python3-prometheus-client "linux-headers-$release:arm64" \
        busybox-static:arm64 "linux-image-$release:arm64" |
        awk '/^[^ ]/ { sub(":$", ""); name = $0 }
             /Candidate:/ && $2 != "(none)" { print name, $2 }')
}

candidate() {
    echo "$versions" | awk -v p="$1" '$1 == p { print $2 }'
}

enable_arm64() {
    if ! dpkg --print-foreign-architectures | grep -qx arm64; then
        log "dpkg --add-architecture arm64"
        dpkg --add-architecture arm64
    fi
    read_versions
    if [ -z "$(candidate busybox-static:arm64)" ]; then
        log "apt-get update (arm64 package lists)"
        apt-get update -q >&2
        read_versions
    fi
}

# Binfmt_misc must be mounted and qemu-aarch64 registered for mmdebstrap
# to run the root's arm64 maintainer scripts.
enable_binfmt() {
    if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    fi
    if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
        update-binfmts --enable qemu-aarch64 >&2
    fi
    [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] ||
        die "qemu-aarch64 is not registered in binfmt_misc"
}

# download_deb PACKAGE: path of its arm64 .deb in $CACHE/debs.
download_deb() {
    local pkg=$1 version file
    version=$(candidate "$pkg:arm64")
    [ -n "$version" ] || die "no arm64 package $pkg"
    mkdir -p "$CACHE/debs"
    file=$(find "$CACHE/debs" -name "${pkg}_${version//:/%3a}_arm64.deb")
    if [ -z "$file" ]; then
        log "downloading $pkg:arm64 $version"
        (cd "$CACHE/debs" && apt-get download -q "$pkg:arm64" >&2)
        file=$(find "$CACHE/debs" -name "${pkg}_${version//:/%3a}_arm64.deb")
    fi
    [ -n "$file" ] || die "cannot download $pkg:arm64"
    echo "$file"
}

# Sets $kernel_dir: the kernel package, unpacked.
unpack_kernel() {
    local deb
    deb=$(download_deb "linux-image-$release")
    kernel_dir=$CACHE/$(basename "$deb" .deb)
    if [ ! -e "$kernel_dir/boot/vmlinuz-$release" ]; then
        log "unpacking $(basename "$deb")"
        rm -rf "$kernel_dir.tmp"
        dpkg-deb -x "$deb" "$kernel_dir.tmp"
        mv "$kernel_dir.tmp" "$kernel_dir"
    fi
}

root_key() {
    {
        echo "recipe $RECIPE $SUITE"
        echo "$versions"
    } | sha256sum | cut -c1-16
}

# Removes what a lab run never reads: documentation, translations, apt's
# lists and caches, a C compiler's back ends (bcc brings its own clang).
trim_root() {
    local root=$1
    rm -rf "$root"/usr/share/{doc,man,info,locale,lintian,bash-completion} \
        "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* \
        "$root"/var/cache/debconf/*-old "$root"/var/log/*
    rm -f "$root"/usr/lib/gcc/aarch64-linux-gnu/*/{cc1,cc1plus,lto1}
    find "$root"/usr/lib/python3* -name __pycache__ -prune \
        -exec rm -rf {} + 2>/dev/null || true
}

# Copies MODULES and the modules they depend on into the root.
add_modules() {
    local root=$1 m path deps
    local src=$kernel_dir/lib/modules/$release
    local dst=$root/lib/modules/$release
    local todo=$MODULES seen=" "
    mkdir -p "$dst"
    cp "$src"/modules.order "$src"/modules.builtin* "$dst"/
    while [ -n "$todo" ]; do
        set -- $todo
        m=$1
        shift
        todo=$*
        case $seen in *" $m "*) continue ;; esac
        seen="$seen$m "
        path=$(cd "$src" && find kernel -name "$m.ko*" | head -n1)
        [ -n "$path" ] || continue      # built in
        mkdir -p "$dst/$(dirname "$path")"
        cp "$src/$path" "$dst/$path"
        deps=$(modinfo -F depends "$src/$path" | tr , ' ')
        todo="$todo $deps"
    done
    depmod -b "$root" "$release"
}

# Sets $initrd: the root as a newc cpio, built unless cached.
build_root() {
    local key mirror sec root
    key=$(root_key)
    initrd=$CACHE/root-$release-$key.cpio
    [ -s "$initrd" ] && return
    enable_binfmt
    mirror=$(mirror_of debian)
    sec=$(mirror_of debian-security)
    mirror=${mirror:-http://deb.debian.org/debian}
    sec=${sec:-http://deb.debian.org/debian-security}
    root=$CACHE/root.tmp
    # An interrupted mmdebstrap can leave /proc or /sys mounted in there.
    if grep -q " $root[/ ]" /proc/mounts; then
        die "$root still has mounts (an interrupted build): unmount them"
    fi
    rm -rf "$root"
    log "building the arm64 root from $mirror (a few minutes)"
    mmdebstrap --arch=arm64 --variant=apt --quiet \
        --include=python3-bpfcc,python3-numpy,python3-prometheus-client \
        --include="linux-headers-$release,busybox-static" \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        "$SUITE" "$root" \
        "deb $mirror $SUITE main" \
        "deb $mirror $SUITE-updates main" \
        "deb $sec $SUITE-security main" >&2
    trim_root "$root"
    add_modules "$root"
    # busybox's applets for what the apt variant lacks (mount, modprobe…);
    # existing commands are kept.
    chroot "$root" /bin/busybox --install -s /bin 2>/dev/null ||
        log "busybox --install failed"
    printf '%s' "$INIT" > "$root/init"
    chmod 755 "$root/init"
    log "packing $(du -sh "$root" | cut -f1) into $initrd"
    (cd "$root" && find . -print0 | cpio --null -o -H newc --quiet) \
        > "$initrd.tmp"
    mv "$initrd.tmp" "$initrd"
    rm -rf "$root"
    # Older roots (other versions) only take space; the one built last
    # before this stays, for a checkout of another recipe working beside.
    ls -t "$CACHE"/root-*.cpio | tail -n +3 | xargs -r rm -f
}

main() {
    [ "$(id -u)" = 0 ] || die "must run as root (it installs packages)"
    apt_install linux-headers-amd64
    release=$(headers_release)
    [ -n "$release" ] || die "cannot tell which kernel linux-headers-amd64 is for"
    release=${release%-amd64}-arm64
    apt_install --no-install-recommends qemu-system-arm mmdebstrap \
        qemu-user-static binfmt-support arch-test cpio kmod
    enable_arm64
    unpack_kernel
    build_root
    command -v qemu-system-aarch64 >/dev/null ||
        die "qemu-system-aarch64 is not on PATH"
    echo "$kernel_dir/boot/vmlinuz-$release"
    echo "$initrd"
}

main "$@"
