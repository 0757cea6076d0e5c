@echo off
rem Builds run.exe, runq.exe and llama2.dll with MSVC, and puts llama2.dll and
rem run.exe into the Python package (llama2c\, llama2c\bin\) as `make run` does.
rem Run from a "x64 Native Tools Command Prompt for Visual Studio" (with make
rem at hand, `make msvc` does the same).
rem /fp:precise keeps llama2.c's arithmetic (same tokens as the other builds);
rem threads the matmuls (OMP_NUM_THREADS sets how many).
rem SRC: the library's sources, LIB_SRC in csrc\Makefile.
set SRC=csrc\checkpoint.c csrc\gguf.c csrc\weight_types.c csrc\quant.c csrc\forward.c csrc\rope.c csrc\ops.c csrc\matmul.c csrc\kernels.c csrc\kernels_scalar.c csrc\kernels_avx2.c csrc\kernels_avx512.c csrc\kernels_amx.c csrc\kernels_neon.c csrc\kernels_q4.c csrc\kernels_q4_neon.c csrc\expf_simd.c csrc\context.c csrc\threadpool.c csrc\memory.c csrc\tokenizer.c csrc\sampler.c csrc\session.c csrc\errors.c csrc\files.c
cl.exe /nologo /O2 /fp:precise /Fe:run.exe csrc\run.c csrc\cli.c %SRC% || exit /b 1
cl.exe /nologo /O2 /fp:precise /Fe:runq.exe csrc\runq.c csrc\cli.c %SRC% || exit /b 1
cl.exe /nologo /O2 /fp:precise /DLLAMA2_BUILD_DLL /LD /Fe:llama2.dll %SRC% || exit /b 1
copy /Y llama2.dll llama2c\llama2.dll >nul
if not exist llama2c\bin mkdir llama2c\bin
copy /Y run.exe llama2c\bin\run.exe >nul
