"""BTF of a kernel package's files, for checking kvmexit's offsets against
kernels other than the running one (e.g. Debian 6.1's kvm-intel.ko, which
no CPU here can load).  Like scripts/extract-vmlinux, it finds the
compressed vmlinux inside a bzImage."""

import glob
import lzma
import os
import struct
import zlib


def elf_section(data, wanted):
    """The bytes of an ELF64 little-endian section, by name."""
    if data[:5] != b"\x7fELF\x02":
        raise ValueError("not ELF64")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<3H", data, 0x3a)

    def header(i):                      # sh_name, sh_offset, sh_size
        base = shoff + i * shentsize
        return (struct.unpack_from("<I", data, base)[0],) + \
            struct.unpack_from("<2Q", data, base + 0x18)

    names = header(shstrndx)[1]
    for i in range(shnum):
        name, offset, size = header(i)
        end = data.index(b"\0", names + name)
        if data[names + name:end] == wanted.encode():
            return data[offset:offset + size]
    raise ValueError("no %s section" % wanted)


def extract_vmlinux(bzimage):
    """The first compressed payload of a bzImage that unpacks to ELF."""
    unpackers = ((b"\xfd7zXZ\x00", lambda d: lzma.LZMADecompressor()
                  .decompress(d)),
                 (b"\x1f\x8b\x08", lambda d: zlib.decompressobj(31)
                  .decompress(d)))
    for magic, unpack in unpackers:
        pos = bzimage.find(magic)
        while pos >= 0:
            try:
                out = unpack(bzimage[pos:])
                if out[:4] == b"\x7fELF":
                    return out
            except (lzma.LZMAError, zlib.error):
                pass
            pos = bzimage.find(magic, pos + 1)
    raise ValueError("no vmlinux found in the bzImage")


def debian_release():
    """The Debian kernel release whose image the lab installs."""
    images = sorted(glob.glob("/boot/vmlinuz-6.1.*-amd64"))
    if not images:
        raise FileNotFoundError("no /boot/vmlinuz-6.1.*-amd64: run "
                                "tests/lab/setup.sh")
    return images[-1][len("/boot/vmlinuz-"):]


def write_btf_dir(release, out):
    """Lay out a /sys/kernel/btf-like folder for a kernel package:
    vmlinux, kvm, kvm_amd, kvm_intel."""
    with open("/boot/vmlinuz-" + release, "rb") as f:
        vmlinux = extract_vmlinux(f.read())
    files = {"vmlinux": elf_section(vmlinux, ".BTF")}
    kvm = "/lib/modules/%s/kernel/arch/x86/kvm" % release
    for name, ko in (("kvm", "kvm.ko"), ("kvm_amd", "kvm-amd.ko"),
                     ("kvm_intel", "kvm-intel.ko")):
        with open(os.path.join(kvm, ko), "rb") as f:
            files[name] = elf_section(f.read(), ".BTF")
    os.makedirs(out, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    return out
