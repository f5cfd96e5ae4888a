"""Parts of ``benchmarks/gpu_check.py``: the GPU readiness check (docs/gpu.md).

- ``runner``: sections with their own time budget and status, an overall budget, a watchdog, and the
  JSON + markdown written after every section (so a killed run still leaves what it measured);
- ``fixtures``: zoo entries on CIFAR-shaped synthetic data, models, method contexts and batches;
- ``timing``: device-synchronised, deadline-aware timers;
- ``correctness``: vmap vs loop, CUDA vs CPU, the memory-format check;
- ``speed``: images/s of every registered method's training step, loop vs vmap, memory formats, PGD and
  transfer-set generation through the evaluation engine;
- ``projection``: GPU-hours of each paper from measured per-step costs and the step counts of the zoo
  and protocols, beside the papers' own training times;
- ``child``: what runs in subprocesses (the ``torchrun`` job, ``torch.compile``);
- ``summary``: the markdown page.

Nothing here may read ``../shared``: the papers' numbers are quoted in ``projection`` with citations.
"""
