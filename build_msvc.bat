@echo off
rem Builds run.exe, runq.exe and llama2.dll with MSVC.
rem Run from a "x64 Native Tools Command Prompt for Visual Studio".
rem /fp:precise keeps llama2.c's arithmetic (same tokens as the other builds);
rem threads the matmuls (OMP_NUM_THREADS sets how many).
set SRC=csrc\checkpoint.c csrc\run.c csrc\runq.c csrc\forward.c csrc\tokenizer.c csrc\sampler.c csrc\session.c csrc\kernels.c csrc\kernels_avx2.c csrc\threadpool.c csrc\memory.c csrc\context.c csrc\errors.c csrc\weight_types.c
cl.exe /nologo /O2 /fp:precise /Fe:run.exe csrc\cli.c %SRC% || exit /b 1
cl.exe /nologo /O2 /fp:precise /DLLAMA2_RUNQ /Fe:runq.exe csrc\cli.c %SRC% || exit /b 1
cl.exe /nologo /O2 /fp:precise /DLLAMA2_BUILD_DLL /LD /Fe:llama2.dll %SRC% || exit /b 1
copy /Y llama2.dll llama2c\llama2.dll >nul
