// SPDX-License-Identifier: Apache-2.0
//
// kvmexit's in-kernel half: count VM exits per thread and exit reason.
//
// Loaded by kvmexit.py through bcc, which compiles it with these macros:
//   PROBE_TRACEPOINT | PROBE_RAW_OLD | PROBE_RAW_NEW   which probe to use
//   TP_HAS_VCPU_ID      the tracepoint has a vcpu_id field (newer kernels)
//   SVM_VCPU_OFF, SVM_VMCB_OFF, VMCB_EXIT_CODE_OFF      raw path on new
//   VMX_VCPU_OFF, VMX_EXIT_REASON_OFF                   kernels (from BTF)
//   KVM_VCPU_ID_OFF     offset of vcpu_id in struct kvm_vcpu (raw paths)
//   FILTER_TGID         count this process only, or
//   FILTER_TID_NOT_IN(tid)  true for TIDs not in a short list, or
//   FILTER_TIDS         count the threads whose bits are set in tid_filter
//                       (TID_WORDS u64 words: one bit per possible TID)
//   MAX_THREADS, MAX_RARE   capacity of the two hash tables
//   DIRECT_SLOTS, HIGH_SLOTS    the counter layout (see slot_of())
//   LATENCY             also time each exit until the vCPU re-enters
// and the numbers kvmexit.py shares with this file (shared_macros()):
//   ISA_VMX, ISA_SVM, VCPU_ID_UNKNOWN, HIGH_BASE, LAT_BUCKETS, NR_LOST and
//   the LOST_* indexes of pcpu_lost.
//
// Layout: a vCPU thread tends to exit again on the CPU it last exited on,
// so each CPU keeps the counters of the thread that exited there last in a
// PERCPU_ARRAY slot (pcpu_cache) and bumps them without a hash lookup.  On a
// miss the evicted thread's counters go back to the percpu hash
// (pcpu_kvm_stat) and the new thread's are loaded from it.  The report reads
// both: on each CPU the cache slot is newer than the hash entry of the same
// thread.

// Exit codes 0..DIRECT_SLOTS-1 count in the slot of the same number, and
// HIGH_SLOTS more cover codes from 0x400 (SVM's NPF, AVIC, VMGEXIT).  The
// layout follows the vendor module: VMX codes end below 96, SVM's main
// ones below 0xb0.  Any other code (a VMX failed-entry flag, SVM_EXIT_ERR,
// a code from a newer CPU) is rare and counted exactly in pcpu_rare_stat.
#define NR_SLOTS (DIRECT_SLOTS + HIGH_SLOTS)

struct thread_counts {
    u32 vcpu_id;
    u32 isa;                    // 0 until this CPU saw the thread exit
    u64 slot[NR_SLOTS];
};

struct cache_slot {
    u64 pid_tgid;               // 0: empty
    struct thread_counts counts;
};

struct rare_key {
    u64 pid_tgid;
    u32 isa;
    u32 code;
};

struct exit_event {
    u32 code;
    u32 isa;
    u32 vcpu_id;                // tracepoint only; raw paths read it lazily
    void *vcpu;                 // struct kvm_vcpu *, raw paths only
};

BPF_PERCPU_ARRAY(pcpu_cache, struct cache_slot, 1);
// Preallocated: an element allocated at the first exit of a thread can
// fail under a burst of new threads (Linux 6.1, seen in the lab), and that
// exit would be lost.  MAX_THREADS is sized for the host by kvmexit.py.
BPF_TABLE("percpu_hash", u64, struct thread_counts, pcpu_kvm_stat,
          MAX_THREADS);
BPF_TABLE("percpu_hash", struct rare_key, u64, pcpu_rare_stat, MAX_RARE);
BPF_PERCPU_ARRAY(pcpu_lost, u64, NR_LOST);
// All zeroes, never written: the counters a new thread starts from (too big
// for the BPF stack, and too big for an inlined memset).
BPF_ARRAY(blank_counts, struct thread_counts, 1);

// NR_SLOTS for a rare code.  The common case, a direct slot, is tested
// first and alone, so that the hit path does not compute the others.
static __always_inline u32 slot_of(u32 code)
{
    if (__builtin_expect(code < DIRECT_SLOTS, 1))
        return code;
    if (code - HIGH_BASE < NR_SLOTS - DIRECT_SLOTS)
        return code - HIGH_BASE + DIRECT_SLOTS;
    return NR_SLOTS;
}

static __always_inline void count_lost(int why)
{
    u64 *lost = pcpu_lost.lookup(&why);

    if (lost)
        (*lost)++;
}

// The exits held in counters that could not be stored.  Off the counting
// paths: only a failed write-back (see switch_cache()) gets here.
static __always_inline void
count_lost_counts(struct thread_counts *counts)
{
    int why = LOST_WRITE_BACK_FAILED;
    u64 *lost = pcpu_lost.lookup(&why), sum = 0;

    if (!lost)
        return;
#pragma unroll
    for (int i = 0; i < NR_SLOTS; i++)
        sum += counts->slot[i];
    *lost += sum;
}

// Read only when a thread enters a CPU's cache slot, to keep the hit path
// free of helper calls.
static __always_inline u32 vcpu_id_of(struct exit_event *ev)
{
#if defined(KVM_VCPU_ID_OFF) && !defined(PROBE_TRACEPOINT)
    int id;

    if (bpf_probe_read_kernel(&id, sizeof(id), ev->vcpu + KVM_VCPU_ID_OFF))
        return VCPU_ID_UNKNOWN;
    return id;
#else
    return ev->vcpu_id;
#endif
}

// Make this CPU's cache slot hold the current thread; NULL if the thread
// table is full (the exit is then counted as lost).
static __always_inline struct thread_counts *
switch_cache(struct cache_slot *cache, u64 pid_tgid, struct exit_event *ev)
{
    struct thread_counts *saved;
    int zero = 0;
    bool fresh;

    // The evicted thread was inserted when it was cached, and kvmexit.py
    // retires (deletes) no thread that a cache slot holds, so this update
    // overwrites its entry in place and cannot fail for lack of room.  If
    // it ever did, the thread's counts on this CPU would vanish: count them.
    if (cache->pid_tgid &&
        pcpu_kvm_stat.update(&cache->pid_tgid, &cache->counts))
        count_lost_counts(&cache->counts);
    cache->pid_tgid = 0;

    saved = pcpu_kvm_stat.lookup(&pid_tgid);
    fresh = !saved;
    if (fresh)
        saved = blank_counts.lookup(&zero);
    if (!saved)
        return NULL;
    bpf_probe_read_kernel(&cache->counts, sizeof(cache->counts), saved);
    // A thread is in the table from its first exit on, so that the update
    // that evicts it from a cache slot always finds its entry.
    if (fresh && pcpu_kvm_stat.insert(&pid_tgid, &cache->counts)) {
        count_lost(LOST_THREAD_TABLE_FULL);
        return NULL;
    }
    // Kept on every CPU's copy, so the report finds them on any of them.
    cache->counts.isa = ev->isa;
    cache->counts.vcpu_id = vcpu_id_of(ev);
    cache->pid_tgid = pid_tgid;
    return &cache->counts;
}

static __always_inline void count_rare(u64 pid_tgid, struct exit_event *ev)
{
    struct rare_key key = {.pid_tgid = pid_tgid, .isa = ev->isa,
                           .code = ev->code};
    u64 zero = 0, *count;

    count = pcpu_rare_stat.lookup_or_try_init(&key, &zero);
    if (count)
        (*count)++;
    else
        count_lost(LOST_RARE_TABLE_FULL);
}

#ifdef LATENCY
// Exit handling time: from a thread's kvm_exit to its next kvm_entry.
// Keyed by thread, so only that thread writes an entry: no atomics.

struct exit_start {
    u64 ts;                     // 0: no exit pending
    u32 isa;
    u32 code;
};

struct latency_key {
    u64 pid_tgid;
    u32 isa;
    u32 code;
};

struct latency {
    u64 count;
    u64 total_ns;
    u64 max_ns;
    u64 log2_hist[LAT_BUCKETS];
};

BPF_HASH(pending_exit, u64, struct exit_start, MAX_THREADS);
BPF_HASH(exit_latency, struct latency_key, struct latency, MAX_THREADS * 8);

static __always_inline void start_exit(u64 pid_tgid, struct exit_event *ev)
{
    struct exit_start start = {.ts = bpf_ktime_get_ns(), .isa = ev->isa,
                               .code = ev->code};

    pending_exit.update(&pid_tgid, &start);
}

static __always_inline void record_latency(struct latency *lat, u64 ns)
{
    u32 bucket = bpf_log2l(ns);

    lat->count++;
    lat->total_ns += ns;
    if (ns > lat->max_ns)
        lat->max_ns = ns;
    if (bucket >= LAT_BUCKETS)
        bucket = LAT_BUCKETS - 1;
    // As in count_exit(): keep the bound where 6.1's verifier can see it.
    asm volatile("" : "+r"(bucket));
    if (bucket < LAT_BUCKETS)
        lat->log2_hist[bucket]++;
}

TRACEPOINT_PROBE(kvm, kvm_entry)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    struct latency zero = {}, *lat;
    struct exit_start *start;
    struct latency_key key;
    u64 now = bpf_ktime_get_ns();

    start = pending_exit.lookup(&pid_tgid);
    if (!start || !start->ts)
        return 0;
    key.pid_tgid = pid_tgid;
    key.isa = start->isa;
    key.code = start->code;
    lat = exit_latency.lookup_or_try_init(&key, &zero);
    if (lat)
        record_latency(lat, now - start->ts);
    else
        count_lost(LOST_LATENCY_TABLE_FULL);
    start->ts = 0;
    return 0;
}
#else
static __always_inline void start_exit(u64 pid_tgid, struct exit_event *ev)
{
}
#endif

#ifdef FILTER_TIDS
// For lists too long to compile as a chain of comparisons (clang crashed
// on 12,500): the same cost for any length.  The verifier inlines an
// array lookup, so this is a few instructions.
BPF_ARRAY(tid_filter, u64, TID_WORDS);
#endif

static __always_inline bool filtered_out(u64 pid_tgid)
{
#if defined(FILTER_TGID)
    return (u32)(pid_tgid >> 32) != FILTER_TGID;
#elif defined(FILTER_TID_NOT_IN)
    u32 tid = pid_tgid;

    return FILTER_TID_NOT_IN(tid);
#elif defined(FILTER_TIDS)
    u32 tid = pid_tgid, word = tid / 64;
    u64 *bits = tid_filter.lookup(&word);

    return !bits || !(*bits & (1ULL << (tid % 64)));
#else
    return false;
#endif
}

static __always_inline int count_exit(u64 pid_tgid, struct exit_event *ev)
{
    struct thread_counts *counts;
    struct cache_slot *cache;
    u32 slot = slot_of(ev->code);
    int zero = 0;

    start_exit(pid_tgid, ev);

    if (slot >= NR_SLOTS) {
        count_rare(pid_tgid, ev);
        return 0;
    }

    cache = pcpu_cache.lookup(&zero);
    if (!cache)
        return 0;
    if (cache->pid_tgid == pid_tgid)
        counts = &cache->counts;
    else
        counts = switch_cache(cache, pid_tgid, ev);
    // Bound the index again where it is used: clang may otherwise test a
    // copy of it, and the verifier would not see the bound.
    asm volatile("" : "+r"(slot));
    if (counts && slot < NR_SLOTS)
        counts->slot[slot]++;
    return 0;
}

#if defined(PROBE_TRACEPOINT)

TRACEPOINT_PROBE(kvm, kvm_exit)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    struct exit_event ev = {.code = args->exit_reason, .isa = args->isa,
                            .vcpu_id = VCPU_ID_UNKNOWN};

    if (filtered_out(pid_tgid))
        return 0;
#ifdef TP_HAS_VCPU_ID
    ev.vcpu_id = args->vcpu_id;
#endif
    return count_exit(pid_tgid, &ev);
}

#elif defined(PROBE_RAW_OLD)

// Older kernels: TP_PROTO(unsigned int exit_reason, struct kvm_vcpu *,
// u32 isa).
int raw_kvm_exit(struct bpf_raw_tracepoint_args *ctx)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    struct exit_event ev = {.code = ctx->args[0], .isa = ctx->args[2],
                            .vcpu_id = VCPU_ID_UNKNOWN,
                            .vcpu = (void *)ctx->args[1]};

    if (filtered_out(pid_tgid))
        return 0;
    return count_exit(pid_tgid, &ev);
}

#elif defined(PROBE_RAW_NEW)

// Linux 5.x and later: TP_PROTO(struct kvm_vcpu *, u32 isa).  The reason
// is where the vendor module keeps it; kvmexit.py found the offsets in the
// module's BTF.  The vcpu is embedded in struct vcpu_svm / vcpu_vmx.
static __always_inline int read_exit_code(struct exit_event *ev)
{
#ifdef SVM_VMCB_OFF
    // The low 32 bits of the VMCB's exit code: what the tracepoint reports.
    if (ev->isa == ISA_SVM) {
        void *vmcb;

        if (bpf_probe_read_kernel(&vmcb, sizeof(vmcb),
                                  ev->vcpu - SVM_VCPU_OFF + SVM_VMCB_OFF))
            return -1;
        return bpf_probe_read_kernel(&ev->code, sizeof(ev->code),
                                     vmcb + VMCB_EXIT_CODE_OFF);
    }
#endif
#ifdef VMX_EXIT_REASON_OFF
    if (ev->isa == ISA_VMX)
        return bpf_probe_read_kernel(&ev->code, sizeof(ev->code),
                                     ev->vcpu - VMX_VCPU_OFF +
                                     VMX_EXIT_REASON_OFF);
#endif
    return -1;
}

int raw_kvm_exit(struct bpf_raw_tracepoint_args *ctx)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    struct exit_event ev = {.isa = ctx->args[1], .vcpu_id = VCPU_ID_UNKNOWN,
                            .vcpu = (void *)ctx->args[0]};

    if (filtered_out(pid_tgid))
        return 0;
    if (read_exit_code(&ev)) {
        count_lost(LOST_REASON_UNREADABLE);
        return 0;
    }
    return count_exit(pid_tgid, &ev);
}

#endif
