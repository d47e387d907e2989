import sys

from bcdtui.app import main

sys.exit(main())
