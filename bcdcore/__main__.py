import sys

try:
    from bcdcore.cli import main
except KeyboardInterrupt:  # Ctrl-C while Python starts: no traceback
    sys.exit(130)

sys.exit(main())
