/*
 * run.c - the `run` program: llama2.c's run on libllama2.
 *
 *   run <checkpoint> [-t temp] [-p topp] [-s seed] [-n steps] [-i prompt]
 *                    [-z tokenizer] [-m generate|chat] [-y system] [-c n_ctx]
 *
 * Flags, defaults and stdout are llama2.c's, byte for byte (the command
 * line is cli.c, shared with runq.c); the model runs in the weights' own
 * format: fp32, bf16 or, for version 2 files, int8.
 */
#include "cli.h"

int main(int argc, char *argv[]) {
    static const llama2_cli_program run = {
        .name = "run",
        .open_flags = 0u,
        .weights = "version 2 (int8) model files run with the int8 kernels.",
    };
    return llama2_cli_main(argc, argv, &run);
}
