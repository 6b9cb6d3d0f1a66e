import sys

from d2c_reports.make_tables import main

sys.exit(main())
