"""`python -m stages.report`: the stage's command line (stages.report.main)."""
from stages.report import main

raise SystemExit(main())
