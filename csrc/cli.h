/*
 * cli.h - the command line the `run` and `runq` programs share (cli.c).
 * Not part of libllama2 or its public header llama2.h: each program is its
 * own main() (run.c, runq.c) plus cli.c, over the library.
 */
#ifndef LLAMA2_CLI_H
#define LLAMA2_CLI_H

#include "llama2.h"

typedef struct {
    const char *name;    /* "run" or "runq": usage and error messages start with it */
    unsigned open_flags; /* for llama2_transformer_open: LLAMA2_OPEN_QUANTIZE in runq */
    const char *weights; /* the usage's last line: what the program does with the weights */
} llama2_cli_program;

/* llama2.c's run: parses its flags, loads the model and tokenizer, runs the
 * generate or chat loop and prints what it prints. Returns the exit status;
 * bad flags and load errors exit with a one-line message on stderr. */
int llama2_cli_main(int argc, char *argv[], const llama2_cli_program *program);

#endif
