/* A monotonic clock for POSIX systems (Linux hosts and boards); microcontroller builds leave it out. */
#define _POSIX_C_SOURCE 199309L
#include <time.h>

#include "et_core.h"

double et_clock_monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}
