import sys

from asyncdepo.cli import main

# guarded: worker processes of a local Dask cluster start by importing the main module again
if __name__ == "__main__":
    sys.exit(main())
