"""Training: ``robbench train zoo/<entry>``.

- :mod:`robbench.train.run`: ``train_entry`` (load the entry, seed, build, resume or ``init_from``, train, save).
- :mod:`robbench.train.loop`: the one training loop (epochs, optimizers, schedule, evaluation, logging,
  resume, DDP) and the :class:`~robbench.train.loop.TrainContext` methods work through.
- :mod:`robbench.train.methods`: one module per method (the per-batch objective); see its docstring for
  the method interface.
- :mod:`robbench.train.distill`: DVERGE's feature distillation on top of the shared attack core.
"""
