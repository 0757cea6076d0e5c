/*
 * errors.c - how every failure is reported (a status code and a message,
 * never an exit or a print), and the library's small utilities.
 */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>

int llama2_fail(llama2_error *err, int code, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->message, sizeof(err->message), fmt, ap);
        va_end(ap);
        err->code = code;
    }
    return code;
}

void llama2_ok(llama2_error *err) {
    if (err) {
        err->code = LLAMA2_OK;
        err->message[0] = '\0';
    }
}

void llama2_free(void *p) { free(p); }

const char *llama2_version(void) { return "0.1.0"; }

