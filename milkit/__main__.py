import sys

from milkit.cli import main

sys.exit(main())
