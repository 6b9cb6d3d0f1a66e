import sys

from d2c_ablations.run import main

sys.exit(main())
