import sys

from membrain.cli import main

sys.exit(main())
