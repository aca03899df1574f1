"""``python -m node`` is the same as the ``dicom-node`` console script."""

from node.cli import main

if __name__ == "__main__":  # worker processes started by forkserver import this module again as __mp_main__
    raise SystemExit(main())
