"""kvmexit's BTF reader and probe choice, on the running kernel and on the
BTF of Debian's 6.1 kernel package (vmlinux, kvm.ko, kvm-amd.ko,
kvm-intel.ko), cross-checked with bpftool."""

import re
import shutil
import struct
import subprocess

import pytest

from helpers import kernel_btf
import kvmexit

TP_DIR = kvmexit.tracepoint_dir()


@pytest.fixture(scope="module")
def debian61(tmp_path_factory):
    """Two /sys/kernel/btf-like folders: an AMD host and an Intel host."""
    full = kernel_btf.write_btf_dir(kernel_btf.debian_release(),
                                    str(tmp_path_factory.mktemp("btf61")))
    dirs = {}
    for vendor, module in (("amd", "kvm_amd"), ("intel", "kvm_intel")):
        d = tmp_path_factory.mktemp(vendor)
        for name in ("vmlinux", "kvm", module):
            shutil.copy("%s/%s" % (full, name), d / name)
        dirs[vendor] = str(d)
    dirs["full"] = full
    return dirs


def bpftool_member_bits(btf_dir, module, struct, member):
    """bits_offset of a struct member as bpftool prints it."""
    args = ["bpftool", "btf", "dump"]
    if module != "vmlinux":
        args += ["-B", btf_dir + "/vmlinux"]
    out = subprocess.run(args + ["file", "%s/%s" % (btf_dir, module),
                                 "format", "raw"],
                         capture_output=True, text=True, check=True).stdout
    block = re.search(r"^\[\d+\] STRUCT '%s' .*\n((?:\t.*\n)+)" % struct, out,
                      re.M).group(1)
    return int(re.search(r"'%s' type_id=\d+ bits_offset=(\d+)" % member,
                         block).group(1))


def test_debian61_amd_offsets_match_bpftool(debian61):
    d = debian61["amd"]
    vmlinux = kvmexit.load_btf("vmlinux", btf_dir=d)
    offsets, why = kvmexit.raw_reason_offsets(vmlinux, d)
    assert offsets == {"SVM_VCPU_OFF": 0, "SVM_VMCB_OFF": 6552,
                       "VMCB_EXIT_CODE_OFF": 112, "KVM_VCPU_ID_OFF": 36}
    assert why == "BTF: vcpu_svm.vmcb at 6552, vmcb.control.exit_code at 112"
    assert bpftool_member_bits(d, "kvm_amd", "vcpu_svm", "vmcb") == 6552 * 8
    assert bpftool_member_bits(d, "kvm_amd", "vmcb_control_area",
                               "exit_code") == 112 * 8
    assert bpftool_member_bits(d, "vmlinux", "kvm_vcpu", "vcpu_id") == 36 * 8


def test_debian61_intel_offsets_match_bpftool(debian61):
    d = debian61["intel"]
    vmlinux = kvmexit.load_btf("vmlinux", btf_dir=d)
    offsets, why = kvmexit.raw_reason_offsets(vmlinux, d)
    assert offsets == {"VMX_VCPU_OFF": 0, "VMX_EXIT_REASON_OFF": 7808,
                       "KVM_VCPU_ID_OFF": 36}
    assert why == "BTF: vcpu_vmx.exit_reason at 7808"
    assert bpftool_member_bits(d, "kvm_intel", "vcpu_vmx",
                               "exit_reason") == 7808 * 8


def test_debian61_kvm_exit_prototype_is_in_kvm_module(debian61):
    vmlinux = kvmexit.load_btf("vmlinux", btf_dir=debian61["full"])
    kvm = kvmexit.load_btf("kvm", vmlinux, debian61["full"])
    assert vmlinux.tracepoint_params("kvm_exit") is None
    assert kvm.tracepoint_params("kvm_exit") == 2      # (vcpu, isa)


def test_debian61_chooses_raw_on_amd_and_intel(debian61):
    amd = kvmexit.choose_probe("auto", TP_DIR, debian61["amd"])
    assert (amd.kind, amd.why) == (
        "raw-new", "kvm_exit(vcpu, isa): BTF: vcpu_svm.vmcb at 6552, "
        "vmcb.control.exit_code at 112")
    assert amd.sees_vcpu_ids
    assert amd.fallback.kind == "tracepoint"
    intel = kvmexit.choose_probe("auto", TP_DIR, debian61["intel"])
    assert (intel.kind, intel.why) == (
        "raw-new", "kvm_exit(vcpu, isa): BTF: vcpu_vmx.exit_reason at 7808")
    assert intel.macros() == ["-DPROBE_RAW_NEW", "-DVMX_VCPU_OFF=0",
                              "-DVMX_EXIT_REASON_OFF=7808",
                              "-DKVM_VCPU_ID_OFF=36"]


def test_raw_asked_for_has_no_fallback(debian61):
    # A raw probe the kernel refuses must not become the tracepoint
    # silently when the user asked for raw.
    forced = kvmexit.choose_probe("raw", TP_DIR, debian61["intel"])
    assert (forced.kind, forced.requested, forced.fallback) == (
        "raw-new", "raw", None)
    auto = kvmexit.choose_probe("auto", TP_DIR, debian61["intel"])
    assert auto.fallback.why == "fallback, the raw tracepoint did not attach"


def with_struct(data, name, base_strings):
    """A copy of split BTF `data` with one more (empty) struct `name`."""
    magic, version, flags, hdr_len, type_off, type_len, str_off, str_len = \
        struct.unpack_from("<HBBIIIII", data)
    types = data[hdr_len + type_off:hdr_len + type_off + type_len]
    strings = data[hdr_len + str_off:hdr_len + str_off + str_len]
    # A module's string offsets continue its base's.
    types += struct.pack("<III", base_strings + len(strings),
                         kvmexit.BTF_KIND_STRUCT << 24, 0)
    strings += name.encode() + b"\0"
    return struct.pack("<HBBIIIII", magic, version, flags, 24, 0, len(types),
                       len(types), len(strings)) + types + strings


def test_intel_kernel_that_can_run_tdx_guests_takes_the_tracepoint(
        debian61, tmp_path):
    # Linux 6.16+ with TDX: its vCPUs exit with isa VMX but are struct
    # vcpu_tdx, where VMX offsets would read the wrong memory.
    for name in ("vmlinux", "kvm", "kvm_intel"):
        shutil.copy("%s/%s" % (debian61["intel"], name), tmp_path / name)
    vmlinux = kvmexit.load_btf("vmlinux", btf_dir=str(tmp_path))
    module = (tmp_path / "kvm_intel").read_bytes()
    (tmp_path / "kvm_intel").write_bytes(
        with_struct(module, "vcpu_tdx", len(vmlinux.strings)))
    tdx = kvmexit.load_btf("kvm_intel", vmlinux, str(tmp_path))
    assert tdx.named(kvmexit.BTF_KIND_STRUCT, "vcpu_tdx") is not None
    assert tdx.offset("vcpu_vmx", "exit_reason") == 7808

    probe = kvmexit.choose_probe("auto", TP_DIR, str(tmp_path))
    assert (probe.kind, probe.why) == (
        "tracepoint", "fallback, kvm_exit(vcpu, isa): BTF has vcpu_tdx: TDX "
        "vCPUs also exit as VMX but are not vcpu_vmx")
    with pytest.raises(kvmexit.Error, match="^--probe raw: cannot get the "
                       "exit reason from the raw tracepoint here \\(kvm_exit"
                       "\\(vcpu, isa\\): BTF has vcpu_tdx"):
        kvmexit.choose_probe("raw", TP_DIR, str(tmp_path))


def test_running_kernel_has_new_layout_and_no_vendor_btf():
    vmlinux = kvmexit.load_btf("vmlinux")
    assert vmlinux.tracepoint_params("kvm_exit") == 2
    assert vmlinux.offset("kvm_vcpu", "vcpu_id") == \
        bpftool_member_bits("/sys/kernel/btf", "vmlinux", "kvm_vcpu",
                            "vcpu_id") // 8
    probe = kvmexit.choose_probe("auto", TP_DIR)
    assert probe.kind == "tracepoint"
    assert probe.macros() == ["-DPROBE_TRACEPOINT", "-DTP_HAS_VCPU_ID"]
    with pytest.raises(kvmexit.Error, match=r"^--probe raw: cannot get the "
                       r"exit reason from the raw tracepoint here"):
        kvmexit.choose_probe("raw", TP_DIR)


def test_missing_btf_falls_back_to_tracepoint(tmp_path):
    probe = kvmexit.choose_probe("auto", TP_DIR, str(tmp_path))
    assert probe.kind == "tracepoint"
    assert probe.why == "fallback, kernel BTF has no kvm_exit prototype"


def test_raw_new_program_with_debian61_offsets_loads_and_attaches(debian61):
    probe = kvmexit.choose_probe("auto", TP_DIR, debian61["amd"])
    b = kvmexit.load_program(kvmexit.Program(
        probe, kvmexit.Selection("all threads", "all"), 64,
        kvmexit.SVM_LAYOUT))
    try:
        kvmexit.attach_raw(b)
        assert list(b.raw_tracepoint_fds) == [b"kvm_exit"]
    finally:
        b.cleanup()


def btf_blob(types, strings):
    """BTF with these type records (bytes each) and string section."""
    body = b"".join(types)
    return struct.pack("<HBBIIIII", 0xeb9f, 1, 0, 24, 0, len(body),
                       len(body), len(strings)) + body + strings


def int_type(name_off):
    return struct.pack("<IIII", name_off, kvmexit.BTF_KIND_INT << 24, 4, 32)


def struct_type(name_off, size, members, kind=kvmexit.BTF_KIND_STRUCT):
    """members: (name offset, type id, byte offset)."""
    return struct.pack("<III", name_off, kind << 24 | len(members), size) + \
        b"".join(struct.pack("<III", m_name, m_type, 8 * m_off)
                 for m_name, m_type, m_off in members)


def typedef(name_off, type_id):
    return struct.pack("<III", name_off, kvmexit.BTF_KIND_TYPEDEF << 24,
                       type_id)


def test_a_type_is_found_where_it_starts_not_where_its_name_is_data():
    strings = b"\0int\0a\0target\0b\0"
    target, a, b = strings.index(b"target"), strings.index(b"a\0"), \
        strings.index(b"b\0")
    btf = kvmexit.Btf(btf_blob([
        int_type(1),                                        # [1]
        # [2]: the target's name offset is also a member's type id here,
        # inside a record, right before another struct.
        struct_type(a, 16, [(a, target, 0), (b, 1, 1)]),
        struct_type(b, 4, [(a, 1, 0)]),                     # [3]
        typedef(target, 5),                                 # [4]
        struct_type(target, 8, [(b, 1, 4)]),                # [5]
    ], strings))
    assert btf.data.find(struct.pack("<I", target), 24) < 24 + 16 + 36
    assert btf.named(kvmexit.BTF_KIND_STRUCT, "target") == 5
    assert btf.named(kvmexit.BTF_KIND_TYPEDEF, "target") == 4
    assert btf.offset("target", "b") == 4
    assert btf.named(kvmexit.BTF_KIND_STRUCT, "missing") is None
    assert btf.named(kvmexit.BTF_KIND_STRUCT, "int") is None


def test_split_btf_continues_its_bases_ids_and_the_base_names_first():
    base_strings = b"\0int\0dup\0"
    base = kvmexit.Btf(btf_blob([int_type(1),
                                 struct_type(5, 4, [(1, 1, 0)])],
                                base_strings))
    # The module's own strings continue the base's offsets.
    own = b"mod\0"
    mod_name = len(base_strings)
    module = kvmexit.Btf(btf_blob([
        struct_type(5, 8, [(1, 1, 4)]),                     # [3] dup again
        struct_type(mod_name, 8, [(5, 2, 4)]),              # [4] mod
    ], own), base)
    assert (base.count, module.first_id, module.count) == (3, 3, 5)
    assert module.named(kvmexit.BTF_KIND_STRUCT, "dup") == 2
    assert module.named(kvmexit.BTF_KIND_STRUCT, "mod") == 4
    assert module.offset("mod", "dup.int") == 4
    assert module.pointee("mod", "dup") is None


def test_btf_whose_last_type_overruns_its_section_is_not_read(tmp_path):
    strings = b"\0int\0s\0"
    record = struct_type(5, 8, [(1, 1, 0), (1, 1, 4)])
    path = tmp_path / "vmlinux"
    path.write_bytes(btf_blob([int_type(1), record[:-4]], strings))
    assert kvmexit.read_btf(str(path), None) is None
    path.write_bytes(btf_blob([int_type(1), record], strings))
    assert kvmexit.read_btf(str(path), None).offset("s", "int") == 0
