/*
 * threadpool.h - a small thread pool for splitting one matmul (or one
 * attention step) over cores.
 *
 * Work is cut into chunks that any thread may claim, the calling thread
 * included, so a worker that the OS has descheduled (another process on the
 * machine, say) never holds up the others: the caller simply takes its
 * chunks. Idle workers spin briefly, then sleep.
 */
#ifndef LLAMA2_THREADPOOL_H
#define LLAMA2_THREADPOOL_H

typedef void (*llama2_task_fn)(void *ctx, int chunk);
typedef struct llama2_pool llama2_pool;

/* n_threads counts the caller; NULL when threads cannot be started. */
llama2_pool *llama2_pool_new(int n_threads);
void llama2_pool_free(llama2_pool *p);
int llama2_pool_threads(const llama2_pool *p);
/* Runs fn(ctx, c) for c = 0 .. n_chunks-1 and returns when all are done. */
void llama2_pool_run(llama2_pool *p, llama2_task_fn fn, void *ctx, int n_chunks);

/* Threads to use by default: OMP_NUM_THREADS or LLAMA2_THREADS if set,
 * else the number of online CPUs. */
int llama2_default_threads(void);

#endif
