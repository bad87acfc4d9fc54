import sys

from xaicomp_core.cli.main import main

sys.exit(main())
