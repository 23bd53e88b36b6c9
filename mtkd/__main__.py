"""``python -m mtkd`` runs the command line."""

from mtkd.cli import main

if __name__ == "__main__":
    main()
