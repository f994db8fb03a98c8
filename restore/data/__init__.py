"""Old command names kept for users: ``python -m restore.data.prepare`` and ``python -m restore.data.synthetic``
run :mod:`restore.datasets.prepare` and :mod:`restore.datasets.synthetic`."""
