import sys

from bcdcore.cli import main

sys.exit(main())
