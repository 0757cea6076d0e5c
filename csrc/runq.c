/*
 * runq.c - the `runq` program: llama2.c's runq on libllama2.
 *
 *   runq <checkpoint> [the flags of run]
 *
 * `run` with one difference: fp32 and bf16 weights are quantized to Q8_0
 * while loading (quant.c), so the model runs with the int8 kernels, as
 * llama2.c's runq runs a version 2 file. Version 2 files run as they are.
 */
#include "cli.h"

int main(int argc, char *argv[]) {
    static const llama2_cli_program runq = {
        .name = "runq",
        .open_flags = LLAMA2_OPEN_QUANTIZE,
        .weights = "fp32 model files are quantized to Q8_0 while loading; version 2 files run as they are.",
    };
    return llama2_cli_main(argc, argv, &runq);
}
