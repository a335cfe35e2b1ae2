// SPDX-License-Identifier: Apache-2.0
//
// kvmexit's in-kernel half: count VM exits per thread and exit reason.
//
// Loaded by kvmexit.py through bcc, which compiles it with these macros:
//   PROBE_TRACEPOINT | PROBE_RAW_OLD | PROBE_RAW_NEW | PROBE_RAW_ARM64
//                       which probe to use
//   KVM_ARM64           arm64's KVM: its kvm_exit (see the end), and none
//                       of x86's other tracepoints
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
//   LATENCY, MAX_LATENCY    also time each exit until the vCPU re-enters
//   DETAIL              also count sub-keys per exit reason (see its section;
//                       on x86 the tracepoint probe only)
//   GROWTH              slots for thread table generations (see its
//                       section)
//   VM_NAMES            also take each VM's name as its first thread enters
//                       the thread table (see its section)
//   TEST_ENTRIES        also raw tracepoint entries for BPF_PROG_TEST_RUN
//                       (tests and benchmarks only)
// and the numbers kvmexit.py shares with this file (shared_macros()):
//   ISA_VMX, ISA_SVM, ISA_ARM64, ARM64_EXCEPTION_TRAP, ARM64_NON_TRAP_BASE,
//   ARM64_SERROR_PENDING, VCPU_ID_UNKNOWN, HIGH_BASE, LAT_SUB_BITS, LAT_SUB,
//   LAT_MAX_LOG2, LAT_BUCKETS, NR_LOST, the LOST_* indexes of pcpu_lost and
//   MMIO_FAST_WRITE; with DETAIL, the exit codes of DETAIL_CODES.
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
    u32 isa;                    // not on raw-old: see isa_of()
    u32 vcpu_id;                // tracepoint only; raw paths read it lazily
    void *vcpu;                 // struct kvm_vcpu *, raw paths only
    const u64 *args;            // raw-old: the tracepoint's arguments
};

// raw-old reads the isa only where it is needed, off the hit path: a
// thread entering a cache slot, a rare code, --latency.
static __always_inline u32 isa_of(struct exit_event *ev)
{
#ifdef PROBE_RAW_OLD
    return ev->args[2];
#else
    return ev->isa;
#endif
}

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

#ifdef GROWTH
// A thread table that grows while tracing: pcpu_kvm_stat is generation 0;
// kvmexit.py puts bigger tables of the same type in thread_tables[1..]
// (GROWTH slots), one ahead of need.  A thread's entry stays in the
// generation it entered, so nothing is copied and no count can be taken
// twice or lost; a new thread enters the oldest with room.  Only the miss
// path (a thread entering or leaving a CPU's cache slot) looks further
// than generation 0: the hit path is unchanged.
BPF_ARRAY_OF_MAPS(thread_tables, "pcpu_kvm_stat", GROWTH);

static __always_inline struct thread_counts *find_thread(u64 *pid_tgid)
{
    struct thread_counts *saved = pcpu_kvm_stat.lookup(pid_tgid);

#pragma unroll
    for (int g = 1; g < GROWTH; g++) {
        int key = g;
        void *table;

        if (saved)
            break;
        table = thread_tables.lookup(&key);
        if (!table)
            break;
        saved = bpf_map_lookup_elem(table, pid_tgid);
    }
    return saved;
}

// Into the oldest generation with room: the newest is kept free by
// kvmexit.py, for the threads that come before its next look.  The thread
// is in no generation yet (find_thread() found none), so it enters one.
static __always_inline int store_thread(u64 *pid_tgid,
                                        struct thread_counts *counts,
                                        u64 flags)
{
    int err = flags == BPF_NOEXIST ?
              pcpu_kvm_stat.insert(pid_tgid, counts) :
              pcpu_kvm_stat.update(pid_tgid, counts);

#pragma unroll
    for (int g = 1; g < GROWTH; g++) {
        int key = g;
        void *table;

        if (!err)
            break;
        table = thread_tables.lookup(&key);
        if (!table)
            break;
        err = bpf_map_update_elem(table, pid_tgid, counts, flags);
    }
    return err;
}

static __always_inline int insert_thread(u64 *pid_tgid,
                                         struct thread_counts *counts)
{
    return store_thread(pid_tgid, counts, BPF_NOEXIST);
}

static __always_inline int update_thread(u64 *pid_tgid,
                                         struct thread_counts *counts)
{
    return store_thread(pid_tgid, counts, BPF_ANY);
}
#else
static __always_inline struct thread_counts *find_thread(u64 *pid_tgid)
{
    return pcpu_kvm_stat.lookup(pid_tgid);
}

static __always_inline int insert_thread(u64 *pid_tgid,
                                         struct thread_counts *counts)
{
    return pcpu_kvm_stat.insert(pid_tgid, counts);
}

static __always_inline int update_thread(u64 *pid_tgid,
                                         struct thread_counts *counts)
{
    return pcpu_kvm_stat.update(pid_tgid, counts);
}
#endif

#ifdef VM_NAMES
// VM names: what each VM is called, taken in the kernel when one of its
// threads first enters the thread table (its first exit since tracing
// began), so that a VM that starts and ends between two of kvmexit.py's
// looks at /proc (every second) is named all the same.  Only there, off the
// hit path: once per thread.  The name is the process name (comm) and the
// first bytes of the command line, which kvmexit.py parses as it parses
// /proc/PID/cmdline; read from the VM's own memory, as the thread is the
// VM's.  The leader's start time tells a PID's processes apart: an entry
// of an earlier process with the same PID is replaced.  kvmexit.py deletes
// each entry once it has read it.  From the kernel's BTF:
//   TASK_GROUP_LEADER_OFF, TASK_COMM_OFF, TASK_START_OFF, TASK_MM_OFF
//                          offsets in struct task_struct
//   MM_ARG_START_OFF, MM_ARG_END_OFF    in struct mm_struct
#define VM_CMDLINE_BYTES 256    // a power of two: see read_cmdline()

struct vm_comm {
    u64 start;                  // the leader's start_boottime (ns)
    u32 cmdline_len;            // bytes of cmdline read; 0: none
    u32 pad;
    char comm[16];              // TASK_COMM_LEN
    char cmdline[VM_CMDLINE_BYTES];
};

BPF_HASH(vm_comm, u32, struct vm_comm, MAX_THREADS);
// Where an entry is built: too big for the BPF stack.
BPF_PERCPU_ARRAY(vm_comm_scratch, struct vm_comm, 1);

// The first VM_CMDLINE_BYTES - 1 bytes of the command line (NUL-separated
// arguments), as /proc/PID/cmdline has them.  Non-faulting: a page of it
// swapped out leaves no command line (the name is then the comm, until
// kvmexit.py reads /proc).  A thread past exit_mm() has no mm: none.
static __always_inline void read_cmdline(struct vm_comm *name, void *task)
{
    unsigned long arg_start, arg_end;
    void *mm;
    u32 len;

    name->cmdline_len = 0;
    if (bpf_probe_read_kernel(&mm, sizeof(mm), task + TASK_MM_OFF) || !mm ||
        bpf_probe_read_kernel(&arg_start, sizeof(arg_start),
                              mm + MM_ARG_START_OFF) ||
        bpf_probe_read_kernel(&arg_end, sizeof(arg_end),
                              mm + MM_ARG_END_OFF) ||
        arg_end <= arg_start)
        return;
    len = arg_end - arg_start < VM_CMDLINE_BYTES ?
          arg_end - arg_start : VM_CMDLINE_BYTES - 1;
    // The mask is what the verifier sees as the bound, however clang
    // compiles the comparison above.
    len &= VM_CMDLINE_BYTES - 1;
    if (!bpf_probe_read_user(name->cmdline, len, (void *)arg_start))
        name->cmdline_len = len;
}

// Name the current thread's process, unless this process (PID and start
// time) is named already.
static __always_inline void take_vm_name(u64 pid_tgid)
{
    u32 tgid = pid_tgid >> 32;
    void *task = (void *)bpf_get_current_task(), *leader;
    struct vm_comm *name, *known;
    int zero = 0;
    u64 start;

    if (bpf_probe_read_kernel(&leader, sizeof(leader),
                              task + TASK_GROUP_LEADER_OFF) ||
        bpf_probe_read_kernel(&start, sizeof(start),
                              leader + TASK_START_OFF))
        return;
    known = vm_comm.lookup(&tgid);
    if (known && known->start == start)
        return;
    name = vm_comm_scratch.lookup(&zero);
    if (!name)
        return;
    name->start = start;
    if (bpf_probe_read_kernel(name->comm, sizeof(name->comm),
                              leader + TASK_COMM_OFF))
        return;
    read_cmdline(name, task);
    vm_comm.update(&tgid, name);
}

// As a thread that exited to KVM ends: its process's name, unless the
// table holds it already.  This names a process whose thread never entered
// the table: a new VM whose thread took a TID that an old VM's entry still
// has (a reused PID, while a cache slot holds the old thread), so that its
// exits were hits.  Its command line only where this tracepoint fires
// before exit_mm() (newer kernels).  A separate program, so the kvm_exit
// program is unchanged by it; one hash lookup per thread end on the host.
TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();

    if (find_thread(&pid_tgid))
        take_vm_name(pid_tgid);
    return 0;
}
#else
static __always_inline void take_vm_name(u64 pid_tgid)
{
}
#endif

// NR_SLOTS for a rare code.  Off the hit path, which tests for a direct
// slot itself (count_exit()).
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

// Copy a thread's counters between its table entry and a cache slot.
// Plain loads and stores, not a helper: cheaper than bpf_probe_read_kernel
// (which checks each word for faults) and than a map update (which takes
// the bucket's lock).  clang expands each memcpy inline; chunks keep each
// expansion under its limit of stores.
#define COPY_WORDS (sizeof(struct thread_counts) / 8)
#define COPY_CHUNK 64
static __always_inline void copy_counts(struct thread_counts *dst,
                                        const struct thread_counts *src)
{
    u64 *d = (u64 *)dst;
    const u64 *s = (const u64 *)src;

#pragma unroll
    for (int i = 0; i < COPY_WORDS; i += COPY_CHUNK)
        __builtin_memcpy(d + i, s + i,
                         8 * (COPY_WORDS - i < COPY_CHUNK ?
                              COPY_WORDS - i : COPY_CHUNK));
}

// The evicted thread's counters go back to its table entry.  It was
// inserted when it was cached, and kvmexit.py retires (deletes) no thread
// that a cache slot holds, so the entry is there; if it ever were not,
// the update inserts it, and if that failed the counts would vanish:
// count them.
static __always_inline void write_back(struct cache_slot *cache)
{
    struct thread_counts *saved = find_thread(&cache->pid_tgid);

    if (saved)
        copy_counts(saved, &cache->counts);
    else if (update_thread(&cache->pid_tgid, &cache->counts))
        count_lost_counts(&cache->counts);
}

// A thread's first exit on this CPU since tracing began: it starts from
// zero, and enters the table now, so that the write-back that evicts it
// from the cache slot always finds its entry.  With VM_NAMES its VM is
// named now, if it is not yet.
static __always_inline struct thread_counts *
enter_new_thread(struct cache_slot *cache, u64 pid_tgid)
{
    struct thread_counts *blank;
    int zero = 0;

    blank = blank_counts.lookup(&zero);
    if (!blank)
        return NULL;
    copy_counts(&cache->counts, blank);
    if (insert_thread(&pid_tgid, &cache->counts)) {
        count_lost(LOST_THREAD_TABLE_FULL);
        return NULL;
    }
    take_vm_name(pid_tgid);
    return &cache->counts;
}

// Make this CPU's cache slot hold the current thread; NULL if the thread
// table is full (the exit is then counted as lost).
static __always_inline struct thread_counts *
switch_cache(struct cache_slot *cache, u64 pid_tgid, struct exit_event *ev)
{
    struct thread_counts *saved, *counts = &cache->counts;

    if (cache->pid_tgid)
        write_back(cache);
    cache->pid_tgid = 0;

    saved = find_thread(&pid_tgid);
    if (saved)
        copy_counts(counts, saved);
    else
        counts = enter_new_thread(cache, pid_tgid);
    if (!counts)
        return NULL;
    // Kept on every CPU's copy, so the report finds them on any of them.
    counts->isa = isa_of(ev);
    counts->vcpu_id = vcpu_id_of(ev);
    cache->pid_tgid = pid_tgid;
    return counts;
}

static __always_inline void count_rare(u64 pid_tgid, struct exit_event *ev)
{
    struct rare_key key = {.pid_tgid = pid_tgid, .isa = isa_of(ev),
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
    u64 hist[LAT_BUCKETS];      // log-linear: see lat_bucket()
};

BPF_HASH(pending_exit, u64, struct exit_start, MAX_THREADS);
BPF_HASH(exit_latency, struct latency_key, struct latency, MAX_LATENCY);
// All zeroes, never written: a new entry's start (too big for the stack).
BPF_ARRAY(blank_latency, struct latency, 1);

static __always_inline void start_exit(u64 pid_tgid, struct exit_event *ev)
{
    struct exit_start start = {.ts = bpf_ktime_get_ns(), .isa = isa_of(ev),
                               .code = ev->code};

    pending_exit.update(&pid_tgid, &start);
}

// Log-linear buckets: one per ns below 2 * LAT_SUB, then LAT_SUB equal
// buckets per power of two, each at most 1/LAT_SUB of its lower bound wide;
// times from 2^LAT_MAX_LOG2 ns on share the last one.  kvmexit.py's
// latency_bucket() is the same function.
static __always_inline u32 lat_bucket(u64 ns)
{
    u32 log2;

    if (ns < 2 * LAT_SUB)
        return ns;
    log2 = bpf_log2l(ns) - 1;
    if (log2 >= LAT_MAX_LOG2)
        return LAT_BUCKETS - 1;
    return (log2 - LAT_SUB_BITS + 1) * LAT_SUB +
           (ns >> (log2 - LAT_SUB_BITS)) - LAT_SUB;
}

static __always_inline void record_latency(struct latency *lat, u64 ns)
{
    u32 bucket = lat_bucket(ns);

    lat->count++;
    lat->total_ns += ns;
    if (ns > lat->max_ns)
        lat->max_ns = ns;
    // As in count_exit(): keep the bound where 6.1's verifier can see it.
    asm volatile("" : "+r"(bucket));
    if (bucket < LAT_BUCKETS)
        lat->hist[bucket]++;
}

static __always_inline void add_latency(struct latency_key *key, u64 ns)
{
    struct latency *lat, *blank;
    int zero = 0;

    lat = exit_latency.lookup(key);
    if (!lat) {
        blank = blank_latency.lookup(&zero);
        if (!blank)
            return;
        lat = exit_latency.lookup_or_try_init(key, blank);
    }
    if (lat)
        record_latency(lat, ns);
    else
        count_lost(LOST_LATENCY_TABLE_FULL);
}

TRACEPOINT_PROBE(kvm, kvm_entry)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    struct exit_start *start;
    struct latency_key key;
    u64 now = bpf_ktime_get_ns();

    start = pending_exit.lookup(&pid_tgid);
    if (!start || !start->ts)
        return 0;
    key.pid_tgid = pid_tgid;
    key.isa = start->isa;
    key.code = start->code;
    add_latency(&key, now - start->ts);
    start->ts = 0;
    return 0;
}

#ifdef TEST_ENTRIES
// For BPF_PROG_TEST_RUN (kvm_entry cannot be test-run): record a handling
// time of ctx->args[2] ns for exit code args[0] of isa args[1], as
// kvm_entry would.
int test_exit_latency(struct bpf_raw_tracepoint_args *ctx)
{
    struct latency_key key = {.pid_tgid = bpf_get_current_pid_tgid(),
                              .isa = ctx->args[1], .code = ctx->args[0]};

    add_latency(&key, ctx->args[2]);
    return 0;
}
#endif
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

// Everything but the hit: a rare or high code, or another thread in the
// cache slot (eviction), or none (this CPU's first exit).
static __always_inline void count_cold(struct cache_slot *cache,
                                       u64 pid_tgid, struct exit_event *ev)
{
    struct thread_counts *counts;
    u32 slot = slot_of(ev->code);

    if (slot >= NR_SLOTS) {
        count_rare(pid_tgid, ev);
        return;
    }
    if (cache->pid_tgid == pid_tgid)
        counts = &cache->counts;
    else
        counts = switch_cache(cache, pid_tgid, ev);
    // Bound the index again where it is used: clang may otherwise test a
    // copy of it, and the verifier would not see the bound.
    asm volatile("" : "+r"(slot));
    if (counts && slot < NR_SLOTS)
        counts->slot[slot]++;
}

// `code` is the exit code as the probe passes it.  On raw-old it is the
// whole u64 argument: the kernel widens the tracepoint's unsigned int with
// zeroes, and were the upper half not zero the exit would go the cold way,
// which counts ev->code (its low half); so the hit path need not cut it.
static __always_inline int count_exit(u64 pid_tgid, u64 code,
                                      struct exit_event *ev)
{
    struct cache_slot *cache;
    int zero = 0;

    start_exit(pid_tgid, ev);

    cache = pcpu_cache.lookup(&zero);
    if (!cache)
        return 0;
    // The hit, on nearly every exit: the thread that exited here last
    // exits again, with a code of a direct slot.  One comparison of each,
    // one increment; nothing else is read.  The code is tested where it
    // is used, in one register: else clang may test one copy and index
    // with another, and 6.1's verifier then refuses the program as an
    // unbounded access (seen on arm64 with --detail).
    if (__builtin_expect(cache->pid_tgid == pid_tgid, 1)) {
        asm volatile("" : "+r"(code));
        if (__builtin_expect(code < DIRECT_SLOTS, 1)) {
            cache->counts.slot[code]++;
            return 0;
        }
    }
    count_cold(cache, pid_tgid, ev);
    return 0;
}

#ifdef DETAIL
#if !defined(PROBE_TRACEPOINT) && !defined(KVM_ARM64)
#error "--detail reads the fields of the kvm_exit tracepoint (x86)"
#endif
// --detail: which port, MSR, page, vector, CR, hypercall or user-space
// exit (on arm64: WFI/WFE, SMCCC function, system register, IPA, MMIO,
// user-space exit) is behind each exit reason.  Compiled only with -DDETAIL, so that
// the default program is unchanged (bcc rewrites map calls and tracepoint
// arguments in its main file only, hence not a header).  Needs the regular
// kvm:kvm_exit tracepoint: its info1, info2 and intr_info fields are the
// exit information the kernel read for it.
//
// Macros from kvmexit.py (DETAIL_KINDS there is the one table of them):
//   DETAIL_PORT, DETAIL_MSR, DETAIL_PAGE, DETAIL_MMIO, DETAIL_VECTOR,
//   DETAIL_CR, DETAIL_HYPERCALL, DETAIL_USER,
//   DETAIL_WFX, DETAIL_SMCCC, DETAIL_SYSREG, DETAIL_IPA (arm64)
//                       kinds of sub-key
//   MAX_DETAIL          room in the detail table
//   PENDING_ENTRIES     pending-count entries per CPU (see "Pending counts")
//   DETAIL_CPUS         CPU numbers run below this (exit_slots' size)
//   TP_HAS_INTR_INFO    kvm_exit has intr_info (else no VMX vectors)
// With TEST_ENTRIES, raw tracepoint entries take the fields as ctx->args,
// for BPF_PROG_TEST_RUN.
//
// Sub-keys come from two places:
//  - kvm_exit's own fields, for the reasons whose exit information holds
//    them: port I/O, CR access (VMX), exceptions and interrupts, SVM's NPF;
//  - KVM's other tracepoints, which fire in the vCPU thread while it
//    handles the exit: kvm_msr, kvm_hypercall, kvm_mmio, kvm_fast_mmio,
//    kvm_page_fault (VMX's EPT violations: their address is not in
//    kvm_exit's fields) and kvm_userspace_exit.  These count under the
//    reason of the thread's last exit (see "The exit being handled").
//
// Fields are kept raw (masked to the bits that name the access) and
// decoded in kvmexit.py, so that this path does shifts and masks only.

// Architectural exit codes (uapi asm/vmx.h and asm/svm.h) come from
// kvmexit.py's DETAIL_CODES: VMX_EXCEPTION_NMI, VMX_EXTERNAL_INTERRUPT,
// VMX_CR_ACCESS, VMX_IO_INSTRUCTION, SVM_EXCP_BASE, SVM_EXCP_END,
// SVM_IOIO, SVM_NPF.

#define VMX_INTR_INFO_VALID 0x80000000u
#define PAGE_MASK_4K (~0xfffull)

// One count per thread and sub-key (added to as "Pending counts" says).
struct detail_key {
    u64 pid_tgid;
    u32 isa;
    u32 code;
    u64 sub;                    // port, MSR, page, address, vector, ...
    u32 kind;
    u32 attr;                   // the access: direction, size, type, ...
};

BPF_HASH(detail_counts, struct detail_key, u64, MAX_DETAIL);
// Sub-keys not counted for lack of room (their exits are counted).
BPF_PERCPU_ARRAY(detail_lost, u64, 1);

// n more of `key` in detail_counts.  Atomic: a thread that moved leaves
// its pending counts on its old CPU, which may add them while its new CPU
// adds the same key's.
static __always_inline void add_detail(struct detail_key *key, u64 n)
{
    u64 zero = 0, *count;
    int first = 0;

    count = detail_counts.lookup_or_try_init(key, &zero);
    if (count) {
        __sync_fetch_and_add(count, n);
        return;
    }
    count = detail_lost.lookup(&first);
    if (count)
        *count += n;
}

// Pending counts
//
// A hash update per event was most of what --detail cost (some 45 ns of a
// port exit's 52).  So each CPU keeps, per entry of detail_pending
// (PENDING_ENTRIES per CPU: two per kind, by the key's lowest bit, so that
// keys taken by turns such as the RTC's ports 0x70 and 0x71 keep one each),
// the last key it counted there and how many of it are not in
// detail_counts yet: the same key again adds one in the entry; another key
// first adds the entry's pending count to detail_counts.  kvmexit.py has
// every CPU add its pending counts before it reads detail_counts
// (flush_detail(), run on each CPU with BPF_PROG_TEST_RUN).
// Exact: an entry is written only on its CPU.  Events there run one at a
// time (tracepoint programs are not preempted); the flush, which may
// interrupt one (it runs in an IPI), leaves the CPU's entries alone while
// an event has one busy, and kvmexit.py runs it again.  The key holds the
// thread, so a thread that moves or is preempted counts its own key
// wherever it runs.
struct detail_pending {
    struct detail_key key;
    u64 count;                  // 0: nothing pending (key unused)
    u64 busy;                   // an event is changing this entry
};

BPF_ARRAY(detail_pending, struct detail_pending,
          DETAIL_CPUS * PENDING_ENTRIES);

static __always_inline bool same_key(const struct detail_key *a,
                                     const struct detail_key *b)
{
    const u64 *x = (const u64 *)a, *y = (const u64 *)b;

    return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

static __always_inline void count_detail(u64 pid_tgid, u32 isa, u32 code,
                                         u32 kind, u64 sub, u32 attr)
{
    struct detail_key key = {.pid_tgid = pid_tgid, .isa = isa,
                             .code = code, .sub = sub, .kind = kind,
                             .attr = attr};
    u32 index = bpf_get_smp_processor_id() * PENDING_ENTRIES +
                (kind * 2 + (sub & 1)) % PENDING_ENTRIES;
    struct detail_pending *p = detail_pending.lookup(&index);

    if (!p) {
        add_detail(&key, 1);
        return;
    }
    p->busy = 1;
    // The flush, on this CPU, sees busy before anything below changes.
    asm volatile("" ::: "memory");
    if (p->count && !same_key(&p->key, &key)) {
        add_detail(&p->key, p->count);
        p->count = 0;
    }
    if (!p->count)
        __builtin_memcpy(&p->key, &key, sizeof(key));
    p->count++;
    asm volatile("" ::: "memory");
    p->busy = 0;
}

// Run by kvmexit.py on each CPU before it reads detail_counts: that CPU's
// pending counts go there.  Returns 1 (run again) if it interrupted an
// event changing one of them.
int flush_detail(struct bpf_raw_tracepoint_args *ctx)
{
    u32 base = bpf_get_smp_processor_id() * PENDING_ENTRIES;
    struct detail_pending *p;

#pragma unroll
    for (int k = 0; k < PENDING_ENTRIES; k++) {
        u32 index = base + k;

        p = detail_pending.lookup(&index);
        if (p && p->busy)
            return 1;
    }
#pragma unroll
    for (int k = 0; k < PENDING_ENTRIES; k++) {
        u32 index = base + k;

        p = detail_pending.lookup(&index);
        if (p && p->count) {
            add_detail(&p->key, p->count);
            p->count = 0;
        }
    }
    return 0;
}

// The exit being handled
//
// kvm_exit keeps each thread's last exit for the events that come while
// the thread handles it.  Nearly always the same thread exits again on
// the same CPU, so each CPU's slot (exit_slots, indexed by CPU) holds the
// last exit of the thread that took it last, and kvm_exit writes it there
// after one comparison, with no hash lookup.  But a thread can be
// preempted, and moved to another CPU, between its kvm_exit and its
// events: its exit_home entry, written only when it takes a slot, says
// where its exit is.  Exact by these rules:
//  - A thread is in one slot at most: taking a slot, it clears its old one
//    (compare-and-swap, so only if that still holds it).  So a slot holding
//    the current thread holds its last exit.
//  - exit_home's state is one word, either IN (the CPU of the thread's
//    slot, and which of its takings of a slot) or AWAY (the exit itself).
//    A thread taking the slot of another moves that one's exit into the
//    other's state with a compare-and-swap from IN this CPU and taking:
//    if the other has taken a slot since, its newer state stays.  The
//    slot changes hands only after that, so whoever finds its own slot
//    taken finds AWAY.
//  - Only a thread itself changes an AWAY state, or writes into its slot.
//    An event that finds the exit in another CPU's slot reads it (and
//    checks the slot still holds the thread after); its return to user
//    space moves it AWAY first, to mark it there.
// An exit word: code | isa << 32 | went_to_user << 40; 0 if none.
#define EXIT_ISA(w) ((u32)((w) >> 32) & 0xff)
#define EXIT_CODE(w) ((u32)(w))
#define EXIT_WENT (1ULL << 40)   // its return to user space is counted
#define HOME_IN (1ULL << 63)
#define HOME_IN_AT(cpu, taking) (HOME_IN | (u64)(taking) << 32 | (cpu))
#define HOME_CPU(state) ((u32)(state))

struct exit_slot {
    u64 pid_tgid;               // 0: free
    u64 exit;                   // an exit word
    u32 taking;                 // the thread's taking of a slot
    // A cache line or two of its own, so that CPUs write no shared line.
    u8 pad[128 - 20];
};

struct exit_home {
    u64 state;                  // HOME_IN_AT(cpu, taking), or an exit word
    u32 takings;                // how many slots the thread has taken
};

BPF_ARRAY(exit_slots, struct exit_slot, DETAIL_CPUS);
// LRU: threads that are gone make room by themselves.
BPF_TABLE("lru_hash", u64, struct exit_home, exit_home, MAX_THREADS);

static __always_inline struct exit_slot *slot_of_cpu(u32 cpu)
{
    return exit_slots.lookup(&cpu);
}

// The thread in `slot` on `cpu` loses it: its exit goes AWAY, unless it
// has taken a slot since (or it is not known, its entry lost to LRU).
static __always_inline void evict_exit(struct exit_slot *slot, u32 cpu,
                                       u64 owner)
{
    struct exit_home *home = exit_home.lookup(&owner);

    if (home)
        __sync_val_compare_and_swap(&home->state,
                                    HOME_IN_AT(cpu, slot->taking),
                                    slot->exit);
}

static __always_inline struct exit_home *home_of(u64 pid_tgid)
{
    struct exit_home blank = {};

    return exit_home.lookup_or_try_init(&pid_tgid, &blank);
}

// The current thread's first exit on this CPU since another took it.
static __always_inline void take_slot(struct exit_slot *slot, u32 cpu,
                                      u64 pid_tgid, u64 exit)
{
    u64 owner = slot->pid_tgid, was;
    struct exit_home *home;
    struct exit_slot *old;
    u32 taking;

    if (owner)
        evict_exit(slot, cpu, owner);
    home = home_of(pid_tgid);
    if (!home) {
        // Nowhere to say where its exit is (not expected of an LRU
        // table): free the slot rather than hold an exit nothing finds.
        slot->pid_tgid = 0;
        return;
    }
    was = home->state;
    taking = home->takings + 1;
    home->takings = taking;
    home->state = HOME_IN_AT(cpu, taking);
    slot->pid_tgid = pid_tgid;
    // Readers on other CPUs rely on this order (see exit_elsewhere()).
    asm volatile("" ::: "memory");
    slot->taking = taking;
    slot->exit = exit;
    if ((was & HOME_IN) && HOME_CPU(was) != cpu) {
        old = slot_of_cpu(HOME_CPU(was));
        if (old)
            __sync_val_compare_and_swap(&old->pid_tgid, pid_tgid, 0);
    }
}

static __always_inline void remember_exit(u64 pid_tgid, u32 isa, u32 code)
{
    u32 cpu = bpf_get_smp_processor_id();
    struct exit_slot *slot = slot_of_cpu(cpu);
    u64 exit = code | (u64)isa << 32;

    if (!slot)
        return;
    if (slot->pid_tgid == pid_tgid)
        slot->exit = exit;
    else
        take_slot(slot, cpu, pid_tgid, exit);
}

// The current thread's exit, found in another CPU's slot or AWAY; 0 if
// none.  `state` is read from home first.
static __always_inline u64 exit_elsewhere(u64 pid_tgid,
                                          struct exit_home *home, u64 *state)
{
    struct exit_slot *slot;
    u64 exit;

    *state = home->state;
    if (!(*state & HOME_IN))
        return *state;
    slot = slot_of_cpu(HOME_CPU(*state));
    if (!slot || slot->pid_tgid != pid_tgid)
        goto moved;
    exit = slot->exit;
    // The thread that takes the slot writes its own exit there after it
    // writes pid_tgid: if the slot still holds this thread, `exit` is its.
    asm volatile("" ::: "memory");
    if (slot->pid_tgid == pid_tgid)
        return exit;
moved:
    // Taken meanwhile: the taker moved the exit AWAY before.
    *state = home->state;
    return *state & HOME_IN ? 0 : *state;
}

// The exit the current thread is handling (an exit word, 0 if none).
static __always_inline u64 exit_being_handled(u64 pid_tgid)
{
    struct exit_slot *slot = slot_of_cpu(bpf_get_smp_processor_id());
    struct exit_home *home;
    u64 state;

    if (slot && slot->pid_tgid == pid_tgid)
        return slot->exit;
    home = exit_home.lookup(&pid_tgid);
    return home ? exit_elsewhere(pid_tgid, home, &state) : 0;
}

// As exit_being_handled(), and marks the exit as returned to user space;
// 0 if it already was.
static __always_inline u64 exit_going_to_user(u64 pid_tgid)
{
    struct exit_slot *slot = slot_of_cpu(bpf_get_smp_processor_id());
    struct exit_home *home;
    struct exit_slot *there;
    u64 exit, state;

    if (slot && slot->pid_tgid == pid_tgid) {
        exit = slot->exit;
        if (exit & EXIT_WENT)
            return 0;
        slot->exit = exit | EXIT_WENT;
        return exit;
    }
    home = exit_home.lookup(&pid_tgid);
    if (!home)
        return 0;
    exit = exit_elsewhere(pid_tgid, home, &state);
    if (!exit || (exit & EXIT_WENT))
        return 0;
    if (state & HOME_IN) {
        // In another CPU's slot: move it AWAY, marked, and free the slot
        // (its CPU may be moving it AWAY too: one of the two wins).
        if (__sync_val_compare_and_swap(&home->state, state,
                                        exit | EXIT_WENT) == state) {
            there = slot_of_cpu(HOME_CPU(state));
            if (there)
                __sync_val_compare_and_swap(&there->pid_tgid, pid_tgid, 0);
            return exit;
        }
        state = home->state;
        if ((state & HOME_IN) || (state & EXIT_WENT) || !state)
            return 0;
        exit = state;
    }
    home->state = exit | EXIT_WENT;
    return exit;
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
    u64 exit = exit_being_handled(pid_tgid);

    if (exit)
        count_detail(pid_tgid, EXIT_ISA(exit), EXIT_CODE(exit), kind, sub,
                     attr);
}

// KVM_RUN returns to user space once per exit that needs the VMM, and
// also without an exit (a signal before entering the guest): only the
// first return after an exit is that exit's.
static __always_inline void detail_user_exit(u32 reason, int err)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u64 exit = exit_going_to_user(pid_tgid);

    if (exit)
        count_detail(pid_tgid, EXIT_ISA(exit), EXIT_CODE(exit), DETAIL_USER,
                     reason, err < 0 ? -err : 0);
}

// MMIO_FAST_WRITE (from kvmexit.py): the MMIO access type beyond
// kvm_mmio's 0..2 of a write KVM completed on its fast MMIO bus.

static __always_inline void detail_page_fault(u64 address, u64 error_code)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u64 exit = exit_being_handled(pid_tgid);

    // SVM's NPF has its address in kvm_exit's fields already.  VMX's
    // EPT violation passes its exit qualification (read, write, fetch in
    // 2:0) as the error code.
    if (exit && EXIT_ISA(exit) == ISA_VMX)
        count_detail(pid_tgid, ISA_VMX, EXIT_CODE(exit), DETAIL_PAGE,
                     address & PAGE_MASK_4K, error_code & 7);
}

#ifndef KVM_ARM64
// x86's events: bcc needs each one's format to compile its probe, and
// arm64's KVM has none of them.
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
#endif

TRACEPOINT_PROBE(kvm, kvm_mmio)
{
    detail_event(DETAIL_MMIO, args->gpa, args->type | args->len << 8);
    return 0;
}

#ifndef KVM_ARM64
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
#endif

TRACEPOINT_PROBE(kvm, kvm_userspace_exit)
{
    detail_user_exit(args->reason, args->errno);
    return 0;
}

#ifdef KVM_ARM64
// arm64's sub-keys: none is in kvm_exit's fields (ret and the exception
// class only), so each comes from the event the kernel traces while it
// handles the trap, counted under that exit as above:
//  - kvm_wfx_arm64 (WFx): is_wfe;
//  - kvm_hvc_arm64 (HVC64): r0, the SMCCC function id (32 bits, as KVM
//    reads it), and the HVC's immediate; 6.1 traces nothing for SMC64;
//  - kvm_handle_sys_reg (SYS64): the trap's ESR, once per trap, for the
//    registers KVM emulates and the ones it does not (kvm_sys_access
//    covers the former only): the register's Op0, Op2, Op1, CRn, CRm
//    (Rt cleared) as the sub-key, the direction bit (1: read) as attr;
//  - kvm_guest_fault (DABT_LOW, IABT_LOW): the IPA's page, and from the
//    ESR the class, WnR and fault status code.
// kvm_mmio and kvm_userspace_exit are KVM's generic events (above).
#define ESR_SYS64_REG 0x3ffc1eull   // Op0 21:20 .. CRn 13:10, CRm 4:1
#define ESR_SYS64_READ 1ull
#define ESR_ABORT_BITS 0xfc00007full    // EC 31:26, WnR 6, FSC 5:0

// At each kvm_exit of a thread asked for (the arm64 kvm_exit probe).
static __always_inline void detail_exit_arm64(u64 pid_tgid, u32 code)
{
    remember_exit(pid_tgid, ISA_ARM64, code);
}

static __always_inline void detail_sys_reg(u64 esr)
{
    detail_event(DETAIL_SYSREG, esr & ESR_SYS64_REG, esr & ESR_SYS64_READ);
}

static __always_inline void detail_guest_fault(u64 ipa, u64 esr)
{
    detail_event(DETAIL_IPA, ipa & PAGE_MASK_4K, esr & ESR_ABORT_BITS);
}

TRACEPOINT_PROBE(kvm, kvm_wfx_arm64)
{
    detail_event(DETAIL_WFX, args->is_wfe, 0);
    return 0;
}

TRACEPOINT_PROBE(kvm, kvm_hvc_arm64)
{
    detail_event(DETAIL_SMCCC, (u32)args->r0, args->imm);
    return 0;
}

TRACEPOINT_PROBE(kvm, kvm_handle_sys_reg)
{
    detail_sys_reg(args->hsr);
    return 0;
}

TRACEPOINT_PROBE(kvm, kvm_guest_fault)
{
    detail_guest_fault(args->ipa, args->hsr);
    return 0;
}

#ifdef TEST_ENTRIES
// As test_kvm_exit() below, for arm64: args[0] is the exit code.
int test_arm64_exit(struct bpf_raw_tracepoint_args *ctx)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    struct exit_event ev = {.code = ctx->args[0], .isa = ISA_ARM64,
                            .vcpu_id = VCPU_ID_UNKNOWN};

    if (filtered_out(pid_tgid))
        return 0;
    detail_exit_arm64(pid_tgid, ev.code);
    return count_exit(pid_tgid, ev.code, &ev);
}

int test_kvm_wfx_arm64(struct bpf_raw_tracepoint_args *ctx)
{
    detail_event(DETAIL_WFX, ctx->args[0], 0);
    return 0;
}

int test_kvm_hvc_arm64(struct bpf_raw_tracepoint_args *ctx)
{
    detail_event(DETAIL_SMCCC, (u32)ctx->args[0], ctx->args[1]);
    return 0;
}

int test_kvm_handle_sys_reg(struct bpf_raw_tracepoint_args *ctx)
{
    detail_sys_reg(ctx->args[0]);
    return 0;
}

int test_kvm_guest_fault(struct bpf_raw_tracepoint_args *ctx)
{
    detail_guest_fault(ctx->args[0], ctx->args[1]);
    return 0;
}
#endif
#endif  // KVM_ARM64

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
    return count_exit(pid_tgid, ev.code, &ev);
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
#endif  // DETAIL

#if defined(KVM_ARM64)

// arm64: TP_PROTO(int ret, unsigned int esr_ec, unsigned long vcpu_pc).
// ret is the kind of exit (kvm_asm.h's ARM_EXCEPTION_*: IRQ, SERROR,
// TRAP, IL, HYP_GONE), with bit 31 set if an SError was pending; esr_ec
// the ESR exception class, which names a trap.  The tracepoint stores ret
// without bit 31, and esr_ec only for traps (0 otherwise); the raw
// arguments have neither done, so both probes count the same code:
// a trap's class (0..63), or ARM64_NON_TRAP_BASE + ret.  kvmexit.py's
// arm64_code() is the same function.
static __always_inline u32 arm64_code(u32 ret, u32 esr_ec)
{
    ret &= ~ARM64_SERROR_PENDING;
    return ret == ARM64_EXCEPTION_TRAP ? esr_ec : ARM64_NON_TRAP_BASE + ret;
}

// Both probes: the exit of (ret, esr_ec) as kvm_exit passes them.
static __always_inline int count_arm64_exit(u32 ret, u32 esr_ec)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    struct exit_event ev = {.code = arm64_code(ret, esr_ec),
                            .isa = ISA_ARM64, .vcpu_id = VCPU_ID_UNKNOWN};

    if (filtered_out(pid_tgid))
        return 0;
#ifdef DETAIL
    detail_exit_arm64(pid_tgid, ev.code);
#endif
    return count_exit(pid_tgid, ev.code, &ev);
}

#if defined(PROBE_TRACEPOINT)

TRACEPOINT_PROBE(kvm, kvm_exit)
{
    return count_arm64_exit(args->ret, args->esr_ec);
}

#else

int raw_kvm_exit(struct bpf_raw_tracepoint_args *ctx)
{
    return count_arm64_exit(ctx->args[0], ctx->args[1]);
}

#endif

#elif defined(PROBE_TRACEPOINT)

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
#if defined(DETAIL) && defined(TP_HAS_INTR_INFO)
    detail_exit(pid_tgid, ev.isa, ev.code, args->info1, args->info2,
                args->intr_info);
#elif defined(DETAIL)
    detail_exit(pid_tgid, ev.isa, ev.code, args->info1, args->info2, 0);
#endif
    return count_exit(pid_tgid, ev.code, &ev);
}

#elif defined(PROBE_RAW_OLD)

// Older kernels: TP_PROTO(unsigned int exit_reason, struct kvm_vcpu *,
// u32 isa).
int raw_kvm_exit(struct bpf_raw_tracepoint_args *ctx)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    struct exit_event ev = {.code = ctx->args[0], .args = ctx->args,
                            .vcpu_id = VCPU_ID_UNKNOWN,
                            .vcpu = (void *)ctx->args[1]};

    if (filtered_out(pid_tgid))
        return 0;
    return count_exit(pid_tgid, ctx->args[0], &ev);
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
    return count_exit(pid_tgid, ev.code, &ev);
}

#endif
