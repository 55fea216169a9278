import sys

from megatron_plugin.generate.cli import main

if __name__ == "__main__":
    sys.exit(main())
