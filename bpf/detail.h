// SPDX-License-Identifier: Apache-2.0
//
// kvmexit --detail: which port, MSR, page, vector, CR, hypercall or
// user-space exit is behind each exit reason.  Included by kvmexit.bpf.c
// only when compiled with -DDETAIL, so that the default program is
// unchanged.  Needs the regular kvm:kvm_exit tracepoint: its info1, info2
// and intr_info fields are the exit information the kernel read for it.
//
// Macros from kvmexit.py (DETAIL_KINDS there is the one table of them):
//   DETAIL_PORT, DETAIL_MSR, DETAIL_PAGE, DETAIL_MMIO, DETAIL_VECTOR,
//   DETAIL_CR, DETAIL_HYPERCALL, DETAIL_USER    kinds of sub-key
//   MAX_DETAIL          room in the detail table
//   TEST_ENTRIES        also raw tracepoint entries that take the fields as
//                       ctx->args, for BPF_PROG_TEST_RUN (tests, benchmarks)
//
// Sub-keys come from two places:
//  - kvm_exit's own fields, for the reasons whose exit information holds
//    them: port I/O, CR access (VMX), exceptions and interrupts, SVM's NPF;
//  - KVM's other tracepoints, which fire in the vCPU thread while it
//    handles the exit: kvm_msr, kvm_hypercall, kvm_mmio, kvm_fast_mmio,
//    kvm_page_fault (VMX's EPT violations: their address is not in
//    kvm_exit's fields) and kvm_userspace_exit.  These count under the
//    reason of the thread's last exit, which exit_now keeps.
//
// Fields are kept raw (masked to the bits that name the access) and
// decoded in kvmexit.py, so that this path does shifts and masks only.

// Architectural exit codes (uapi asm/vmx.h and asm/svm.h).
#define VMX_EXCEPTION_NMI 0
#define VMX_EXTERNAL_INTERRUPT 1
#define VMX_CR_ACCESS 28
#define VMX_IO_INSTRUCTION 30
#define SVM_EXCP_BASE 0x40
#define SVM_EXCP_END 0x60
#define SVM_IOIO 0x7b
#define SVM_NPF 0x400

#define VMX_INTR_INFO_VALID 0x80000000u
#define PAGE_MASK_4K (~0xfffull)

// Keyed by thread, so that only that thread writes an entry: no atomics.
struct detail_key {
    u64 pid_tgid;
    u32 isa;
    u32 code;
    u64 sub;                    // port, MSR, page, address, vector, ...
    u32 kind;
    u32 attr;                   // the access: direction, size, type, ...
};

// The thread's last exit, for the events that come while it is handled.
struct exit_now {
    u32 isa;                    // 0: no exit seen yet
    u32 code;
    u32 went_to_user;           // its return to user space is counted
};

BPF_HASH(detail_counts, struct detail_key, u64, MAX_DETAIL);
// LRU: threads that are gone make room by themselves.
BPF_TABLE("lru_hash", u64, struct exit_now, exit_now, MAX_THREADS);
// Sub-keys not counted for lack of room (their exits are counted).
BPF_PERCPU_ARRAY(detail_lost, u64, 1);

static __always_inline void count_detail(u64 pid_tgid, u32 isa, u32 code,
                                         u32 kind, u64 sub, u32 attr)
{
    struct detail_key key = {.pid_tgid = pid_tgid, .isa = isa,
                             .code = code, .sub = sub, .kind = kind,
                             .attr = attr};
    u64 zero = 0, *count;
    int first = 0;

    count = detail_counts.lookup_or_try_init(&key, &zero);
    if (count) {
        (*count)++;
        return;
    }
    count = detail_lost.lookup(&first);
    if (count)
        (*count)++;
}

static __always_inline void remember_exit(u64 pid_tgid, u32 isa, u32 code)
{
    struct exit_now now = {.isa = isa, .code = code}, *saved;

    saved = exit_now.lookup(&pid_tgid);
    if (saved)
        *saved = now;
    else
        exit_now.update(&pid_tgid, &now);
}

static __always_inline void detail_svm(u64 pid_tgid, u32 code, u64 info1,
                                       u64 info2)
{
    // IOIO's EXITINFO1: port in 31:16; type (1 = in), string, rep and
    // operand size in 6:0.
    if (code == SVM_IOIO)
        count_detail(pid_tgid, ISA_SVM, code, DETAIL_PORT,
                     (info1 >> 16) & 0xffff, info1 & 0x7f);
    // NPF: EXITINFO2 the guest-physical address, EXITINFO1 the page fault
    // error code (present, write, user, reserved bit, fetch).
    else if (code == SVM_NPF)
        count_detail(pid_tgid, ISA_SVM, code, DETAIL_PAGE,
                     info2 & PAGE_MASK_4K, info1 & 0x1f);
    // The vector is in the code; counted as a sub-key all the same, so
    // that every view of vectors has one source.
    else if (code >= SVM_EXCP_BASE && code < SVM_EXCP_END)
        count_detail(pid_tgid, ISA_SVM, code, DETAIL_VECTOR,
                     code - SVM_EXCP_BASE, 0);
}

static __always_inline void detail_vmx(u64 pid_tgid, u32 code, u64 info1,
                                       u32 intr_info)
{
    // Exit qualification of I/O: port in 31:16, size-1 in 2:0,
    // direction (1 = in) in 3, string in 4, rep in 5.
    if (code == VMX_IO_INSTRUCTION)
        count_detail(pid_tgid, ISA_VMX, code, DETAIL_PORT,
                     (info1 >> 16) & 0xffff, info1 & 0x3f);
    // Of a CR access: the CR in 3:0, the access type in 5:4.
    else if (code == VMX_CR_ACCESS)
        count_detail(pid_tgid, ISA_VMX, code, DETAIL_CR, info1 & 0xf,
                     (info1 >> 4) & 3);
    // VM-exit interruption information: vector 7:0, type 10:8.
    else if ((code == VMX_EXCEPTION_NMI ||
              code == VMX_EXTERNAL_INTERRUPT) &&
             (intr_info & VMX_INTR_INFO_VALID))
        count_detail(pid_tgid, ISA_VMX, code, DETAIL_VECTOR,
                     intr_info & 0xff, (intr_info >> 8) & 7);
}

// At each kvm_exit of a thread asked for.
static __always_inline void detail_exit(u64 pid_tgid, u32 isa, u32 code,
                                        u64 info1, u64 info2, u32 intr_info)
{
    remember_exit(pid_tgid, isa, code);
    if (isa == ISA_SVM)
        detail_svm(pid_tgid, code, info1, info2);
    else if (isa == ISA_VMX)
        detail_vmx(pid_tgid, code, info1, intr_info);
}

// An event of the exit the thread is handling; none for threads whose
// exits are not traced (filtered out, or none seen since tracing began).
static __always_inline void detail_event(u32 kind, u64 sub, u32 attr)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    struct exit_now *now = exit_now.lookup(&pid_tgid);

    if (now && now->isa)
        count_detail(pid_tgid, now->isa, now->code, kind, sub, attr);
}

// KVM_RUN returns to user space once per exit that needs the VMM, and
// also without an exit (a signal before entering the guest): only the
// first return after an exit is that exit's.
static __always_inline void detail_user_exit(u32 reason, int err)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    struct exit_now *now = exit_now.lookup(&pid_tgid);

    if (!now || !now->isa || now->went_to_user)
        return;
    now->went_to_user = 1;
    count_detail(pid_tgid, now->isa, now->code, DETAIL_USER, reason,
                 err < 0 ? -err : 0);
}

// MMIO access types beyond kvm_mmio's 0..2 (unsatisfied read, read,
// write): a write KVM completed on its fast MMIO bus (ioeventfd).
#define MMIO_FAST_WRITE 3

static __always_inline void detail_page_fault(u64 address, u64 error_code)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    struct exit_now *now = exit_now.lookup(&pid_tgid);

    // SVM's NPF has its address in kvm_exit's fields already.  VMX's
    // EPT violation passes its exit qualification (read, write, fetch in
    // 2:0) as the error code.
    if (now && now->isa == ISA_VMX)
        count_detail(pid_tgid, ISA_VMX, now->code, DETAIL_PAGE,
                     address & PAGE_MASK_4K, error_code & 7);
}

TRACEPOINT_PROBE(kvm, kvm_msr)
{
    detail_event(DETAIL_MSR, args->ecx, args->write);
    return 0;
}

TRACEPOINT_PROBE(kvm, kvm_hypercall)
{
    detail_event(DETAIL_HYPERCALL, args->nr, 0);
    return 0;
}

TRACEPOINT_PROBE(kvm, kvm_mmio)
{
    detail_event(DETAIL_MMIO, args->gpa, args->type | args->len << 8);
    return 0;
}

TRACEPOINT_PROBE(kvm, kvm_fast_mmio)
{
    detail_event(DETAIL_MMIO, args->gpa, MMIO_FAST_WRITE);
    return 0;
}

TRACEPOINT_PROBE(kvm, kvm_page_fault)
{
    detail_page_fault(args->fault_address, args->error_code);
    return 0;
}

TRACEPOINT_PROBE(kvm, kvm_userspace_exit)
{
    detail_user_exit(args->reason, args->errno);
    return 0;
}

#ifdef TEST_ENTRIES
// The same paths with the tracepoints' fields as ctx->args, for
// BPF_PROG_TEST_RUN (regular tracepoint programs cannot be test-run).
int test_kvm_exit(struct bpf_raw_tracepoint_args *ctx)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    struct exit_event ev = {.code = ctx->args[0], .isa = ctx->args[1],
                            .vcpu_id = ctx->args[5]};

    if (filtered_out(pid_tgid))
        return 0;
    detail_exit(pid_tgid, ev.isa, ev.code, ctx->args[2], ctx->args[3],
                ctx->args[4]);
    return count_exit(pid_tgid, &ev);
}

int test_kvm_msr(struct bpf_raw_tracepoint_args *ctx)
{
    detail_event(DETAIL_MSR, (u32)ctx->args[1], ctx->args[0]);
    return 0;
}

int test_kvm_hypercall(struct bpf_raw_tracepoint_args *ctx)
{
    detail_event(DETAIL_HYPERCALL, ctx->args[0], 0);
    return 0;
}

int test_kvm_mmio(struct bpf_raw_tracepoint_args *ctx)
{
    detail_event(DETAIL_MMIO, ctx->args[2], ctx->args[0] | ctx->args[1] << 8);
    return 0;
}

int test_kvm_fast_mmio(struct bpf_raw_tracepoint_args *ctx)
{
    detail_event(DETAIL_MMIO, ctx->args[0], MMIO_FAST_WRITE);
    return 0;
}

int test_kvm_page_fault(struct bpf_raw_tracepoint_args *ctx)
{
    detail_page_fault(ctx->args[0], ctx->args[1]);
    return 0;
}

int test_kvm_userspace_exit(struct bpf_raw_tracepoint_args *ctx)
{
    detail_user_exit(ctx->args[0], (int)ctx->args[1]);
    return 0;
}
#endif
