import sys

from asyncdepo.cli import main

sys.exit(main())
