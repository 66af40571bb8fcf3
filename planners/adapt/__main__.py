import sys

from planners.adapt.cli import main

sys.exit(main())
