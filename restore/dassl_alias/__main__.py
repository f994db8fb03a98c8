"""``python -m restore.dassl_alias install | uninstall | status | run ...`` (see the package doc).

The command line lives here, not in the package: the ``.pth`` file imports ``restore.dassl_alias`` at
start-up, and runpy warns when the module it runs as ``__main__`` was imported before.
"""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
