from dtrain.cli import main
import sys

sys.exit(main())
