/* For `make test-future` only: the suite under libfaketime.
 *
 * librdkafka waits with C11 cnd_timedwait, whose CLOCK_REALTIME deadline it
 * computes from the faked clock; glibc's cnd_timedwait calls its internal
 * pthread_cond_timedwait directly, past libfaketime's wrapper, so the
 * kernel waits until the real clock reaches the faked deadline (35 days
 * under FAKETIME=+35d): every timed wait in librdkafka hangs and a daemon
 * never exits. Preloaded before libfaketime, this cnd_timedwait calls the
 * exported pthread_cond_timedwait, which libfaketime wraps and converts.
 * (cnd_t and mtx_t are glibc's pthread_cond_t and pthread_mutex_t.)
 */
#include <errno.h>
#include <pthread.h>
#include <threads.h>
#include <time.h>

int cnd_timedwait(cnd_t *restrict cond, mtx_t *restrict mtx,
                  const struct timespec *restrict ts) {
    int r = pthread_cond_timedwait((pthread_cond_t *)cond,
                                   (pthread_mutex_t *)mtx, ts);
    if (r == 0)
        return thrd_success;
    return r == ETIMEDOUT ? thrd_timedout : thrd_error;
}
