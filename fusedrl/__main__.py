"""`python -m fusedrl ...` runs the `fusedrl` command (see fusedrl.cli)."""
import sys

from fusedrl.cli import main

if __name__ == "__main__":
    sys.exit(main())
