import sys

from beam_moe.cli import main

sys.exit(main())
