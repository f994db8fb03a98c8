"""Alias of :mod:`restore.datasets.prepare` (the command ``python -m restore.data.prepare``)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("restore.datasets.prepare", run_name="__main__", alter_sys=True)
