/*
 * threadpool.c - see threadpool.h. POSIX threads or Win32 threads; atomics
 * through the GCC/Clang builtins or MSVC's Interlocked functions.
 *
 * A job is published as a 64-bit ticket: generation in the high half, next
 * chunk in the low half. Claiming a chunk is a compare-and-swap on the
 * ticket, so a thread still looking at an old job can never claim a chunk of
 * a new one. The caller waits until every claimed chunk has finished.
 */
#include "threadpool.h"

#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#if defined(_WIN32)
#include <windows.h>
typedef HANDLE thread_t;
typedef CRITICAL_SECTION mutex_t;
typedef CONDITION_VARIABLE cond_t;
#define mutex_init(m) InitializeCriticalSection(m)
#define mutex_destroy(m) DeleteCriticalSection(m)
#define mutex_lock(m) EnterCriticalSection(m)
#define mutex_unlock(m) LeaveCriticalSection(m)
#define cond_init(c) InitializeConditionVariable(c)
#define cond_destroy(c) ((void)0)
#define cond_wait(c, m) SleepConditionVariableCS((c), (m), INFINITE)
#define cond_broadcast(c) WakeAllConditionVariable(c)
#define yield_cpu() SwitchToThread()
#else
#include <pthread.h>
#include <sched.h>
#include <unistd.h>
typedef pthread_t thread_t;
typedef pthread_mutex_t mutex_t;
typedef pthread_cond_t cond_t;
#define mutex_init(m) pthread_mutex_init((m), NULL)
#define mutex_destroy(m) pthread_mutex_destroy(m)
#define mutex_lock(m) pthread_mutex_lock(m)
#define mutex_unlock(m) pthread_mutex_unlock(m)
#define cond_init(c) pthread_cond_init((c), NULL)
#define cond_destroy(c) pthread_cond_destroy(c)
#define cond_wait(c, m) pthread_cond_wait((c), (m))
#define cond_broadcast(c) pthread_cond_broadcast(c)
#define yield_cpu() sched_yield()
#endif

#if defined(__GNUC__) || defined(__clang__)
#define load64(p) __atomic_load_n((p), __ATOMIC_SEQ_CST)
#define store64(p, v) __atomic_store_n((p), (v), __ATOMIC_SEQ_CST)
#define cas64(p, expect, want) \
    __atomic_compare_exchange_n((p), &(expect), (want), 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)
#define load32(p) __atomic_load_n((p), __ATOMIC_SEQ_CST)
#define store32(p, v) __atomic_store_n((p), (v), __ATOMIC_SEQ_CST)
#define add32(p, v) __atomic_add_fetch((p), (v), __ATOMIC_SEQ_CST)
#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#else
#define cpu_relax() ((void)0)
#endif
#else /* MSVC */
#include <intrin.h>
static uint64_t load64_(volatile uint64_t *p) {
    return (uint64_t)InterlockedCompareExchange64((volatile LONG64 *)p, 0, 0);
}
#define load64(p) load64_(p)
#define store64(p, v) InterlockedExchange64((volatile LONG64 *)(p), (LONG64)(v))
static int cas64_(volatile uint64_t *p, uint64_t *expect, uint64_t want) {
    uint64_t seen = (uint64_t)InterlockedCompareExchange64((volatile LONG64 *)p, (LONG64)want, (LONG64)*expect);
    if (seen == *expect) return 1;
    *expect = seen;
    return 0;
}
#define cas64(p, expect, want) cas64_((p), &(expect), (want))
#define load32(p) InterlockedCompareExchange((volatile long *)(p), 0, 0)
#define store32(p, v) InterlockedExchange((volatile long *)(p), (v))
#define add32(p, v) InterlockedAdd((volatile long *)(p), (v))
#define cpu_relax() _mm_pause()
#endif

#define SPIN_ROUNDS 20000 /* a few tens of microseconds before a worker sleeps */

struct llama2_pool {
    int n_threads; /* including the caller */
    thread_t *threads;
    mutex_t lock;
    cond_t wake;
    uint64_t ticket;    /* generation << 32 | next chunk */
    long remaining;     /* chunks of the current job not yet finished */
    long sleepers;      /* workers blocked on `wake` */
    long stop;
    llama2_task_fn fn;  /* the current job; written only while no chunk is claimable */
    void *ctx;
    long n_chunks;
    /* when another process keeps taking our workers' cores, waiting for them
     * costs more than it saves: after many stalled jobs, run alone a while */
    int recent_jobs, recent_stalls, solo_jobs_left;
};

#define CLOSED 0x7fffffffu /* chunk number of a retired ticket: >= any int chunk count */
#define STALL_MIN_NS 20000 /* waits shorter than this are never stalls */
#define STALL_WINDOW 64    /* jobs per look at how many stalled */
#define STALL_LIMIT 8      /* stalls in a window that send the pool solo */
#define SOLO_JOBS 4096     /* jobs run on the caller alone before trying again */

/* A monotonic clock in nanoseconds, for telling a stall from a long job. */
static int64_t now_ns(void) {
#if defined(_WIN32)
    LARGE_INTEGER f, c;
    QueryPerformanceFrequency(&f);
    QueryPerformanceCounter(&c);
    return (int64_t)((double)c.QuadPart * 1e9 / (double)f.QuadPart);
#else
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
#endif
}

/* Claims and runs chunks of the job published in the ticket seen first. */
static void run_chunks(llama2_pool *p) {
    uint64_t t = load64(&p->ticket);
    for (;;) {
        long chunk = (long)(t & 0xffffffffu);
        if (chunk >= load32(&p->n_chunks)) return;
        uint64_t claimed = t;
        if (!cas64(&p->ticket, claimed, t + 1)) {
            if ((claimed >> 32) != (t >> 32)) return; /* a newer job: not ours to start here */
            t = claimed;
            continue;
        }
        p->fn(p->ctx, (int)chunk);
        add32(&p->remaining, -1);
        t = t + 1;
    }
}

#if defined(_WIN32)
static DWORD WINAPI worker(LPVOID arg)
#else
static void *worker(void *arg)
#endif
{
    llama2_pool *p = (llama2_pool *)arg;
    uint64_t seen_gen = load64(&p->ticket) >> 32;
    for (;;) {
        uint64_t gen = load64(&p->ticket) >> 32;
        for (int spin = 0; gen == seen_gen && spin < SPIN_ROUNDS && !load32(&p->stop); spin++) {
            cpu_relax();
            gen = load64(&p->ticket) >> 32;
        }
        if (gen == seen_gen) {
            mutex_lock(&p->lock);
            add32(&p->sleepers, 1);
            while ((load64(&p->ticket) >> 32) == seen_gen && !load32(&p->stop)) cond_wait(&p->wake, &p->lock);
            add32(&p->sleepers, -1);
            mutex_unlock(&p->lock);
        }
        if (load32(&p->stop)) break;
        seen_gen = load64(&p->ticket) >> 32;
        run_chunks(p);
    }
#if defined(_WIN32)
    return 0;
#else
    return NULL;
#endif
}

int llama2_default_threads(void) {
    const char *names[] = {"LLAMA2_THREADS", "OMP_NUM_THREADS"};
    for (int i = 0; i < 2; i++) {
        const char *v = getenv(names[i]);
        if (v && atoi(v) > 0) return atoi(v) > 256 ? 256 : atoi(v);
    }
#if defined(_WIN32)
    SYSTEM_INFO info;
    GetSystemInfo(&info);
    return info.dwNumberOfProcessors > 0 ? (int)info.dwNumberOfProcessors : 1;
#else
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)(n > 256 ? 256 : n) : 1;
#endif
}

llama2_pool *llama2_pool_new(int n_threads) {
    if (n_threads < 1) n_threads = 1;
    llama2_pool *p = (llama2_pool *)calloc(1, sizeof(*p));
    if (!p) return NULL;
    p->n_threads = 1;
    p->threads = (thread_t *)calloc((size_t)n_threads, sizeof(thread_t));
    if (!p->threads) { free(p); return NULL; }
    mutex_init(&p->lock);
    cond_init(&p->wake);
    for (int i = 0; i + 1 < n_threads; i++) {
#if defined(_WIN32)
        p->threads[i] = CreateThread(NULL, 0, worker, p, 0, NULL);
        if (!p->threads[i]) break;
#else
        if (pthread_create(&p->threads[i], NULL, worker, p) != 0) break;
#endif
        p->n_threads++;
    }
    return p; /* fewer threads than asked if the OS refused some */
}

int llama2_pool_threads(const llama2_pool *p) { return p ? p->n_threads : 1; }

void llama2_pool_free(llama2_pool *p) {
    if (!p) return;
    mutex_lock(&p->lock);
    store32(&p->stop, 1);
    cond_broadcast(&p->wake);
    mutex_unlock(&p->lock);
    for (int i = 0; i + 1 < p->n_threads; i++) {
#if defined(_WIN32)
        WaitForSingleObject(p->threads[i], INFINITE);
        CloseHandle(p->threads[i]);
#else
        pthread_join(p->threads[i], NULL);
#endif
    }
    mutex_destroy(&p->lock);
    cond_destroy(&p->wake);
    free(p->threads);
    free(p);
}

void llama2_pool_run(llama2_pool *p, llama2_task_fn fn, void *ctx, int n_chunks) {
    if (n_chunks <= 0) return;
    if (!p || p->n_threads == 1 || n_chunks == 1 || p->solo_jobs_left > 0) {
        if (p && p->solo_jobs_left > 0) p->solo_jobs_left--;
        for (int c = 0; c < n_chunks; c++) fn(ctx, c);
        return;
    }
    /* No chunk of the previous job is claimable or running now, but a worker
     * may still hold that job's last ticket: if the ticket still read the
     * same when the new chunk count appeared, that worker's compare-and-swap
     * would claim a chunk of the new job under the old generation (seen as a
     * chunk run twice and a job that returned early). So the old ticket is
     * retired first, through a generation that has nothing to claim, and the
     * new job gets the generation after it. */
    uint64_t gen = load64(&p->ticket) >> 32;
    store64(&p->ticket, (((gen + 1) & 0xffffffffu) << 32) | CLOSED);
    p->fn = fn;
    p->ctx = ctx;
    store32(&p->n_chunks, n_chunks);
    store32(&p->remaining, n_chunks);
    store64(&p->ticket, ((gen + 2) & 0xffffffffu) << 32);
    if (load32(&p->sleepers) > 0) {
        mutex_lock(&p->lock);
        cond_broadcast(&p->wake);
        mutex_unlock(&p->lock);
    }
    int64_t t0 = now_ns();
    run_chunks(p);
    int64_t t1 = now_ns();
    long spin = 0;
    for (; load32(&p->remaining) > 0; spin++) {
        if (spin < SPIN_ROUNDS)
            cpu_relax();
        else
            yield_cpu(); /* a worker holding a chunk may be waiting for this core */
    }
    /* A stall: the caller waited for the others longer than it worked itself
     * (a balanced job waits about one chunk, a small part of its own work),
     * so some worker's core was taken away. Long jobs on big matrices wait
     * long in absolute terms without being stalls. */
    int64_t waited = spin ? now_ns() - t1 : 0;
    int stalled = waited > STALL_MIN_NS && waited > t1 - t0;
    p->recent_stalls += stalled;
    if (++p->recent_jobs == STALL_WINDOW) {
        if (p->recent_stalls >= STALL_LIMIT) p->solo_jobs_left = SOLO_JOBS;
        p->recent_jobs = p->recent_stalls = 0;
    }
}
