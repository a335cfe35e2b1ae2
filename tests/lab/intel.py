"""The Intel lab: Debian's 6.1 kernel in Bochs, whose emulated CPU has VMX.

QEMU's emulator has no VMX, so the AMD lab (amd.py) cannot show a VMX exit.
Debian's Bochs 2.7 emulates VMX with EPT and unrestricted guest; Debian's
6.1 kernel boots there and its kvm_intel fires kvm:kvm_exit with isa=1.

    tests/lab/run --lab intel [--timeout SECS] [--outdir DIR] -- CMD...

    from intel import IntelLab
    rc, output = IntelLab().run(cmd, timeout=900, outdir=str(tmp_path))

What this lab adds to core.py's runner is its machine.  Bochs shares no
files with this machine, so:
  - the lab's root filesystem is an ext4 image built here from this
    machine's installed packages (python3-bpfcc and its dependency
    closure, numpy, kmod, the 6.1 headers and kvm modules), with a
    busybox initramfs and a GRUB ISO to boot from (Bochs has no direct
    kernel boot).  They are cached under $KVMEXIT_INTEL_LAB_CACHE
    (default /var/cache/kvmexit-lab/intel) and rebuilt when the packages,
    the kernel or this builder change;
  - the image has room after its filesystem for each run's input: a tar
    of this repository (the working tree, as it is now), of `outdir` and
    of the init's command line (core.py), unpacked at boot at the same
    paths as here.  The guest mounts the filesystem read-only under a tmpfs
    overlay, so only that room is ever written;
  - what the command writes under `outdir` (the same path inside), the
    init's markers included, comes back as a tar the guest writes to
    that room (Bochs writes a flat disk image straight to its file),
    unpacked into `outdir` here.  The markers are seen only then, so
    only the timeout ends a lab that hangs.
The serial console (Bochs sends it to a socket here: its output to a file
is buffered) shows the command's output live, and the boot when it fails.
Only one Bochs runs at a time (it listens on a VNC port); a lock
serialises runs.
"""

import fcntl
import hashlib
import io
import json
import os
import re
import select
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import time

from core import LAB_DIR, REPO, GUEST_PYTHON, Lab, LabError, Machine, \
    run_setup, tail

SETUP = os.path.join(LAB_DIR, "intel_setup.sh")
CACHE = os.environ.get("KVMEXIT_INTEL_LAB_CACHE",
                       "/var/cache/kvmexit-lab/intel")

# Bumped whenever what build_root/build_initrd/build_iso make changes in a
# way the package list does not show.
BUILD_VERSION = 3

# The lab's root filesystem: these packages and all they depend on ...
ROOT_PACKAGES = ["python3-bpfcc", "python3-numpy", "python3", "kmod",
                 "dash", "bash", "coreutils", "util-linux", "mount", "grep",
                 "sed", "gzip", "tar", "procps", "busybox-static"]
# ... and these without their dependencies (a compiler bcc does not use).
HEADER_PACKAGES = ["linux-headers-{release}",
                   "linux-headers-{common}-common", "linux-kbuild-6.1"]
SKIPPED = ("/usr/share/doc/", "/usr/share/man/", "/usr/share/info/",
           "/usr/share/locale/", "/usr/share/lintian/")
# Loaded by the initramfs, with what they need, to mount the root image.
INITRD_MODULES = ["ata_piix", "sd_mod", "ext4", "overlay"]
# On the root image for modprobe.
ROOT_MODULES = ["kvm_intel"]

# The emulated machine.  Skylake-X has VMX with EPT, VPID and unrestricted
# guest, which kvm_intel's defaults want.  ips: the emulated clock runs
# at this many instructions a second: about what Bochs manages on a
# 2-CPU cloud machine, so the guest's clock is near real time, and the
# BIOS's and kernel's busy-waits cost fewer instructions than at 100M.
MEMORY_MB = 1024
BOCHSRC = """\
megs: {memory}
romimage: file=/usr/share/bochs/BIOS-bochs-latest
vgaromimage: file=/usr/share/vgabios/vgabios.bin
cpu: model=corei7_skylake_x, count=1, ips=30000000, reset_on_triple_fault=0, ignore_bad_msrs=1
pci: enabled=1, chipset=i440fx
ata0: enabled=1, ioaddr1=0x1f0, ioaddr2=0x3f0, irq=14
ata0-master: type=cdrom, path={iso}, status=inserted
ata0-slave: type=disk, mode=flat, path={root}
boot: cdrom
com1: enabled=1, mode=socket-client, dev=127.0.0.1:{port}
display_library: rfb, options="timeout=0"
# Without a sound card here, Bochs' ALSA output aborts it at start.
sound: waveoutdrv=dummy, waveindrv=dummy, midioutdrv=dummy
log: {log}
panic: action=fatal
error: action=report
info: action=ignore
debug: action=ignore
"""
GRUB_CFG = """\
set timeout=0
set default=0
menuentry "kvmexit Intel lab" {{
    linux /boot/vmlinuz console=ttyS0,115200 loglevel=4 panic=0 kvmexit_lab_tail_mb={tail_mb}
    initrd /boot/initrd.img
}}
"""
# Bochs' disks are whole cylinders of 16 heads x 63 sectors x 512 bytes.
CYLINDER = 16 * 63 * 512

# The initramfs: load the disk, ext4 and overlay modules, mount the root
# image read-only under a writable tmpfs and switch to it.
INITRD_INIT = """\
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
say() {{ echo "initramfs: $* (uptime $(cut -d' ' -f1 /proc/uptime))"; }}
say "loading disk modules"
for m in {modules}; do insmod /modules/$m.ko; done
say "waiting for the disks"
# libata probes them in the background, slowly under Bochs.
for try in $(seq 600); do
    grep -q 'sda$' /proc/partitions && break
    [ $((try % 20)) = 0 ] && say "still waiting; the kernel says:" &&
        dmesg | tail -5
    sleep 0.5
done
say "mounting the root image"
mkdir -p /lower /rw
# noload: no journal replay, nothing written to the cached image.
mount -t ext4 -o ro,noload /dev/sda /lower
mount -t tmpfs -o size=600m rw /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay \
    -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /root
[ -x /root/sbin/kvmexit-lab-init ] || {{
    cat /proc/partitions
    dmesg | grep -i -E 'ata|scsi|sda|ext4|overlay' | tail -20
    echo "{error} initramfs: cannot mount the root image on /dev/sda"
    poweroff -f
}}
umount /proc /sys
mount --move /dev /root/dev
exec switch_root /root /sbin/kvmexit-lab-init
"""

# The root image's first process: unpack the run's disk (the repository
# and the init's command line), run it, write the output directory and the
# command's output back to that disk.
ROOT_INIT = """\
#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug
mount -t tmpfs tmp /tmp
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs shm /dev/shm
# Kernel messages would cut into the lines sent back on the console.
dmesg -n 1
# The run's input is a tar after the filesystem, where GRUB's command
# line says; the results go {input_mb} MiB further.
for word in $(cat /proc/cmdline); do
    case $word in kvmexit_lab_tail_mb=*) tail_mb=${{word#*=}} ;; esac
done
dd if=/dev/sda bs=1M skip=$tail_mb count={input_mb} 2>/dev/null |
    tar -x -C / 2>/dev/null
[ -f /kvmexit-lab/command ] || {{
    echo "{error} no run input on /dev/sda at $tail_mb MiB"
    busybox poweroff -f; exit 1; }}
. /kvmexit-lab/env
# Before the init's checks: kvm:kvm_exit exists once kvm.ko is loaded.
modprobe kvm_intel
mkdir -p "$OUTDIR" "$MARKERS"
cd "$REPO"
echo "{started} $(cut -d' ' -f1 /proc/uptime)"
# The command file holds the lab's init (tests/lab/init.py) and the command.
/bin/sh /kvmexit-lab/command </dev/null 2>&1 | tee "$MARKERS/output"
# Back on the disk: a header with the length, then the gzipped tar of
# the output directory.
tar -c -z -f /tmp/out.tgz -C "$OUTDIR" .
{{ printf '{results}%016d' $(stat -c %s /tmp/out.tgz); cat /tmp/out.tgz; }} |
    dd of=/dev/sda bs=1M seek=$((tail_mb + {input_mb})) iflag=fullblock \
    conv=notrunc,fsync 2>/dev/null
echo "{done}"
sync
busybox poweroff -f
"""

MARK = "KVMEXIT-INTEL-LAB"
MARKS = {"error": MARK + " ERROR", "started": MARK + " STARTED",
         "done": MARK + " DONE", "results": "KVMEXIT-LAB-RESULTS"}
# Room after the root filesystem: the run's input, then its results.
INPUT_MB = 32
RESULTS_MB = 64
MB = 2 ** 20


def log(msg):
    print("intel lab: " + msg, file=sys.stderr, flush=True)


# --- packages ----------------------------------------------------------------

def installed_packages():
    """{name: (version, [[alternatives] of each dependency])} and
    {virtual name: [providers]}, of the installed packages."""
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${db:Status-Abbrev}\t${Package}\t"
         "${Version}\t${Pre-Depends}, ${Depends}\t${Provides}\n"],
        stdout=subprocess.PIPE, text=True, check=True).stdout
    packages, provides = {}, {}
    for line in out.splitlines():
        status, name, version, depends, provided = line.split("\t")
        if status != "ii ":
            continue
        packages[name] = (version, [
            [re.split(r"[\s(:]", alt.strip())[0] for alt in dep.split("|")]
            for dep in depends.split(",") if dep.strip()])
        for virtual in provided.split(","):
            if virtual.strip():
                provides.setdefault(re.split(r"[\s(]", virtual.strip())[0],
                                    []).append(name)
    return packages, provides


def closure(roots, packages, provides):
    """The installed packages `roots` need, themselves included."""
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        if name not in packages:
            raise LabError(f"package {name} is not installed")
        seen.add(name)
        for alternatives in packages[name][1]:
            for alt in alternatives:
                found = [alt] if alt in packages else [
                    p for p in provides.get(alt, []) if p in packages]
                if found:
                    todo.append(found[0])
                    break
    return seen


def package_files(names):
    out = subprocess.run(["dpkg-query", "-L"] + sorted(names),
                         stdout=subprocess.PIPE, text=True, check=True).stdout
    return sorted({line for line in out.splitlines()
                   if line.startswith("/") and not line.startswith(SKIPPED)})


def lab_inputs(release):
    """What the cached images are made of, and its digest."""
    packages, provides = installed_packages()
    common = release.removesuffix("-amd64")
    headers = [p.format(release=release, common=common)
               for p in HEADER_PACKAGES]
    names = sorted(closure(ROOT_PACKAGES, packages, provides) |
                   set(headers))
    for name in headers:
        if name not in packages:
            raise LabError(f"package {name} is not installed")
    text = json.dumps({"build": BUILD_VERSION, "release": release,
                       "packages": [(n, packages[n][0]) for n in names],
                       "initrd": INITRD_INIT, "init": ROOT_INIT,
                       "grub": GRUB_CFG})
    return names, hashlib.sha256(text.encode()).hexdigest()


# --- building the images -----------------------------------------------------

def copy_path(path, staging):
    """Copy one file, symlink or directory entry of this machine to the
    same path under `staging`, whose /bin, /lib... are usr-merged links."""
    dest = staging + path
    if os.path.lexists(dest):
        return
    if os.path.isdir(path) and not os.path.islink(path):
        os.makedirs(dest, exist_ok=True)
        return
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if os.path.lexists(dest):       # the parent was a link to a copied dir
        return
    shutil.copy2(path, dest, follow_symlinks=False)


def copy_pycache(path, staging):
    """Debian compiles Python modules when installing them, outside the
    package's file list: copy the bytecode too, or every run in the slow
    emulator compiles it again."""
    if not path.endswith(".py"):
        return
    head, name = os.path.split(path)
    cache = os.path.join(head, "__pycache__")
    stem = name[:-3] + "."
    try:
        entries = os.listdir(cache)
    except OSError:
        return
    for entry in entries:
        if entry.startswith(stem) and entry.endswith(".pyc"):
            copy_path(os.path.join(cache, entry), staging)


def fix_dangling_links(staging):
    """Links to files outside the packages (/etc/alternatives/...): copy
    their targets, until none is left dangling."""
    for _ in range(5):
        missing = []
        for top, dirs, files in os.walk(staging):
            for name in dirs + files:
                link = os.path.join(top, name)
                if os.path.islink(link) and not os.path.exists(link):
                    target = os.path.realpath(link[len(staging):])
                    if os.path.exists(target) and \
                            not os.path.lexists(staging + target):
                        missing.append(target)
        if not missing:
            return
        for target in missing:
            copy_path(target, staging)


def alternative_links(staging):
    """Links update-alternatives made (libblas.so.3 for numpy, awk...):
    in no package's file list.  Those whose target was copied."""
    top = "/var/lib/dpkg/alternatives"
    for name in sorted(os.listdir(top)):
        with open(os.path.join(top, name)) as f:
            lines = f.read().split("\n")
        # Mode, master link, then (slave name, slave link) pairs up to an
        # empty line.
        links = [lines[1]]
        for i in range(2, len(lines) - 1, 2):
            if not lines[i]:
                break
            links.append(lines[i + 1])
        for link in links:
            target = os.path.realpath(link)
            if os.path.islink(link) and os.path.exists(staging + target):
                copy_path(link, staging)
                # The link goes through /etc/alternatives/NAME.
                via = os.path.join(os.path.dirname(link), os.readlink(link))
                if os.path.islink(via):
                    copy_path(via, staging)


def smoke_test(staging):
    """What every run needs from the image, tried here in a chroot: a
    missing library shows now, not after minutes of booting Bochs."""
    proc = subprocess.run(["chroot", staging, GUEST_PYTHON, "-c",
                           "import bcc, numpy, numpy.linalg"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    if proc.returncode != 0:
        raise LabError("the lab's root image cannot import bcc and numpy:\n"
                       + proc.stdout[-2000:])


def module_files(release, modules):
    """The .ko files of `modules` and what they need, in load order."""
    # -a: without it, the names after the first are its parameters.
    out = subprocess.run(["modprobe", "-S", release, "-a", "--show-depends"]
                         + modules, stdout=subprocess.PIPE, text=True,
                         check=True).stdout
    files = []
    for line in out.splitlines():
        words = line.split()
        if words[:1] == ["insmod"] and words[1] not in files:
            files.append(words[1])
    return files


def build_root(release, names, staging):
    for top in ("bin", "sbin", "lib", "lib64"):
        os.makedirs(os.path.join(staging, "usr", top))
        os.symlink("usr/" + top, os.path.join(staging, top))
    for path in package_files(names):
        if os.path.lexists(path):
            copy_path(path, staging)
            copy_pycache(path, staging)
    fix_dangling_links(staging)
    alternative_links(staging)
    fix_dangling_links(staging)
    moddir = f"/lib/modules/{release}"
    for path in module_files(release, ROOT_MODULES):
        copy_path(path, staging)
    for name in os.listdir(moddir):
        if name.startswith("modules."):
            copy_path(os.path.join(moddir, name), staging)
    # Where bcc looks for the headers (init.py's checks would link them too).
    common = release.removesuffix("-amd64")
    for name, target in (("build", f"linux-headers-{release}"),
                         ("source", f"linux-headers-{common}-common")):
        if not os.path.lexists(staging + moddir + "/" + name):
            os.symlink("/usr/src/" + target, staging + moddir + "/" + name)
    for top in ("proc", "sys", "dev", "tmp", "root", "etc", "run"):
        os.makedirs(os.path.join(staging, top), exist_ok=True)
    with open(staging + "/etc/passwd", "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\n")
    with open(staging + "/etc/group", "w") as f:
        f.write("root:x:0:\n")
    write_script(staging + "/sbin/kvmexit-lab-init", ROOT_INIT.format(
        input_mb=INPUT_MB, **MARKS))
    subprocess.run(["ldconfig", "-r", staging], check=True)
    smoke_test(staging)


def write_script(path, text):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)


def disk_size(directory):
    used = int(subprocess.run(["du", "-sb", directory],
                              stdout=subprocess.PIPE, text=True,
                              check=True).stdout.split()[0])
    # Room for ext4's own metadata and for what the runs write.
    size = used * 5 // 4 + 256 * 2 ** 20
    return -(-size // MB) * MB


def make_ext4(staging, image):
    """The filesystem, then room for runs; returns where that room starts
    (MiB)."""
    size = disk_size(staging)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "kvmexit-lab",
                    "-d", staging, image, str(size // 1024)], check=True,
                   stdout=subprocess.DEVNULL)
    tail_mb = -(-size // MB)
    total = (tail_mb + INPUT_MB + RESULTS_MB) * MB
    with open(image, "r+b") as f:
        f.truncate(-(-total // CYLINDER) * CYLINDER)
    return tail_mb


def build_initrd(release, path):
    with tempfile.TemporaryDirectory(prefix="initrd-", dir=CACHE) as tree:
        for top in ("bin", "proc", "sys", "dev", "root", "modules"):
            os.makedirs(os.path.join(tree, top))
        # The kernel opens it for /init's stdin, stdout and stderr before
        # anything is mounted.
        os.mknod(tree + "/dev/console", stat.S_IFCHR | 0o600,
                 os.makedev(5, 1))
        shutil.copy2("/bin/busybox", tree + "/bin/busybox")
        modules = module_files(release, INITRD_MODULES)
        for ko in modules:
            shutil.copy2(ko, os.path.join(tree, "modules",
                                          os.path.basename(ko)))
        names = " ".join(os.path.basename(ko)[:-3] for ko in modules)
        write_script(tree + "/init", INITRD_INIT.format(
            modules=names, **MARKS))
        listing = subprocess.run(["find", "."], cwd=tree,
                                 stdout=subprocess.PIPE, check=True).stdout
        with open(path, "wb") as f:
            cpio = subprocess.Popen(["cpio", "-o", "-H", "newc", "--quiet"],
                                    cwd=tree, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE)
            gz = subprocess.Popen(["gzip", "-1"], stdin=cpio.stdout, stdout=f)
            cpio.stdout.close()
            cpio.communicate(listing)
            if cpio.wait() or gz.wait():
                raise LabError("cannot build the initramfs")


def build_iso(kernel, initrd, tail_mb, path):
    with tempfile.TemporaryDirectory(prefix="iso-", dir=CACHE) as tree:
        os.makedirs(tree + "/boot/grub")
        shutil.copy2(kernel, tree + "/boot/vmlinuz")
        shutil.copy2(initrd, tree + "/boot/initrd.img")
        with open(tree + "/boot/grub/grub.cfg", "w") as f:
            f.write(GRUB_CFG.format(tail_mb=tail_mb))
        proc = subprocess.run(["grub-mkrescue", "-o", path, tree],
                              stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise LabError("grub-mkrescue failed: " + proc.stdout[-1000:])


def images(kernel):
    """The cached root image and ISO, (re)built if their inputs changed:
    {"root": path, "iso": path, "release": release, "tail": offset of the
    room for runs}."""
    release = os.path.basename(kernel).removeprefix("vmlinuz-")
    names, digest = lab_inputs(release)
    root, iso = os.path.join(CACHE, "root.img"), os.path.join(CACHE,
                                                             "lab.iso")
    stamp = os.path.join(CACHE, "inputs")
    try:
        with open(stamp) as f:
            saved, tail_mb = f.read().split()
        if saved == digest and os.path.exists(root) and os.path.exists(iso):
            return {"root": root, "iso": iso, "release": release,
                    "tail": int(tail_mb) * MB}
    except (FileNotFoundError, ValueError):
        pass
    started = time.monotonic()
    log(f"building the root image, initramfs and ISO in {CACHE} "
        f"({len(names)} packages)")
    for path in (stamp, root, iso):
        if os.path.exists(path):
            os.unlink(path)
    with tempfile.TemporaryDirectory(prefix="root-", dir=CACHE) as staging:
        build_root(release, names, staging)
        tail_mb = make_ext4(staging, root + ".new")
    initrd = os.path.join(CACHE, "initrd.img")
    build_initrd(release, initrd)
    build_iso(kernel, initrd, tail_mb, iso + ".new")
    os.rename(root + ".new", root)
    os.rename(iso + ".new", iso)
    with open(stamp, "w") as f:
        f.write(f"{digest} {tail_mb}\n")
    log(f"built in {time.monotonic() - started:.0f} s")
    return {"root": root, "iso": iso, "release": release,
            "tail": tail_mb * MB}


def repo_files():
    """The repository's files as they are now, tracked or new."""
    out = subprocess.run(["git", "-C", REPO, "ls-files", "-z", "-c", "-o",
                          "--exclude-standard"], stdout=subprocess.PIPE,
                         check=True).stdout
    # Not bytecode: the lab's Python makes its own.
    return sorted({p for p in out.decode().split("\0") if p and
                   "__pycache__/" not in p and
                   os.path.isfile(os.path.join(REPO, p))})


def run_input(command, outdir, markers):
    """A tar of the repository and of `outdir` as they are now, at their
    paths, the init's command line and where things go."""
    env = "".join(f"{k}={shlex.quote(v)}\n" for k, v in (
        ("REPO", REPO), ("OUTDIR", outdir), ("MARKERS", markers)))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) \
            as tar:
        for name in repo_files():
            tar.add(os.path.join(REPO, name),
                    arcname=os.path.join(REPO, name).lstrip("/"))
        # What the caller put there for the command (a plan, a script).
        tar.add(outdir, arcname=outdir.lstrip("/"))
        for name, text in (("command", command + "\n"), ("env", env)):
            data = text.encode()
            info = tarfile.TarInfo("kvmexit-lab/" + name)
            info.size, info.mtime, info.mode = len(data), time.time(), 0o644
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    if len(data) > INPUT_MB * MB:
        raise LabError(f"the run's input ({len(data)} bytes: the repository "
                       f"and {outdir}) does not fit in the lab's {INPUT_MB} "
                       "MiB for it")
    return data


def write_input(image, tail, data):
    """The run's input where the guest reads it; no results yet."""
    with open(image, "r+b") as f:
        f.seek(tail)
        f.write(data + bytes(-len(data) % 512))
        f.seek(tail + INPUT_MB * MB)
        f.write(bytes(512))


# --- running -----------------------------------------------------------------

class IntelLab(Lab):
    name = "Intel lab"
    tag = "intel lab"
    live_markers = False
    show_from = MARKS["started"]

    def setup(self):
        return run_setup(SETUP)

    def lock(self):
        return Lock()

    def prepare(self, kernel):
        return images(kernel)

    def launch(self, imgs, init_command, run):
        write_input(imgs["root"], imgs["tail"], run_input(
            init_command, run.outdir, run.markers))
        # Left behind by a Bochs that was killed; the lock file of ours is
        # what keeps two runs apart.
        if os.path.exists(imgs["root"] + ".lock"):
            os.unlink(imgs["root"] + ".lock")
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        config = os.path.join(run.work, "bochsrc")
        with open(config, "w") as f:
            f.write(BOCHSRC.format(
                memory=MEMORY_MB, port=server.getsockname()[1],
                iso=imgs["iso"], root=imgs["root"],
                log=os.path.join(run.work, "bochs.log")))
        with open(config + ".rc", "w") as f:
            f.write("c\n")      # Debian's Bochs starts in its debugger
        with open(os.path.join(run.work, "bochs.out"), "w") as out:
            proc = subprocess.Popen(
                ["bochs-bin", "-q", "-f", config, "-rc", config + ".rc"],
                stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        return BochsMachine(proc, server)

    def connect(self, machine):
        return machine.accept()

    def failed(self, run):
        text = run.text()
        if MARKS["error"] in text or "Kernel panic" in text:
            return "its console ends:\n" + text[-2000:]
        return ""

    def copy_out(self, run):
        return unpack_results(run.target["root"], run.target["tail"] +
                              INPUT_MB * MB, run.outdir)

    def output(self, run):
        try:
            with open(os.path.join(run.markers, "output"),
                      errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def booted(self, run):
        return MARKS["started"] in run.text() or super().booted(run)

    def kernel_log(self, run):
        logs = [(name, tail(os.path.join(run.work, name), 20))
                for name in ("bochs.log", "bochs.out")]
        return "".join(f"Bochs' {name} ends:\n{text}\n"
                       for name, text in logs if text) + \
            "its console ends:\n" + run.text()[-3000:]


class BochsMachine(Machine):
    """Bochs, whose console connects to a socket here once it starts."""

    def __init__(self, proc, server):
        super().__init__(proc, None)
        self.server = server

    def accept(self):
        if self.console is None and \
                select.select([self.server], [], [], 0)[0]:
            self.console, _ = self.server.accept()
        return self.console

    def close(self):
        super().close()
        self.server.close()


class Lock:
    """One lab at a time: Bochs listens on a fixed VNC port, and the cache
    is rebuilt in place."""

    def __enter__(self):
        os.makedirs(CACHE, exist_ok=True)
        self.file = open(os.path.join(CACHE, "lock"), "w")
        fcntl.flock(self.file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self.file.close()


def unpack_results(disk, offset, outdir):
    """The output directory, written back to the run's disk: unpack it.
    False if the lab wrote none."""
    magic = MARKS["results"].encode()
    with open(disk, "rb") as f:
        f.seek(offset)
        head = f.read(len(magic) + 16)
        if not head.startswith(magic):
            return False
        data = f.read(int(head[len(magic):]))
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(outdir)
    return True
