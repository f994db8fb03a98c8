"""Alias of :mod:`restore.datasets.synthetic` (the command ``python -m restore.data.synthetic``)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("restore.datasets.synthetic", run_name="__main__", alter_sys=True)
