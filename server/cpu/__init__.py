"""CPU control: how many threads the server runs and where, and the CPU-only kernels and routes.

budget          the CPUs this process may use (affinity and the cgroup quota)
threads         the thread plan (engine, prefill workers, OpenMP wait policy) from the budget and settings
omp_pools       OpenMP pools per thread: sized, released when a thread goes idle
thread_names    names the kernel sees (top -H, /proc/<pid>/task/*/comm)
governor        lowers and restores the engine's thread count while other processes want the cores
canary          a low-priority probe thread: tells the governor whether a competitor is waiting
decode_pacing   the engine thread's decode steps yield between prefill chunks when the cores are contended
prefill_workers threads that prefill while the engine thread decodes
idle_memory     freed memory back to the system once idle
linear          oneDNN-packed linears, chosen per weight shape by measuring
paged_attention decode attention over the paged KV cache in place (C++: paged_attention.cpp)

Nothing here imports the engine, the model or the adapters: they import this package.
"""
