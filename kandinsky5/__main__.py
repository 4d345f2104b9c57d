import sys

from kandinsky5.cli.main import main

sys.exit(main())
